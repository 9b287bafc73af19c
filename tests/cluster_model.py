"""The small models the engine-on-Ray and durable-log tests share, and how long they wait.

The durable-log tests count records per step, so they keep three tables; the
Ray tests add an fp8 table (every serving layout crosses processes).
"""

MODEL = """
model small {
  defaults { dim 8; dtype f32; optimizer rowwise_adagrad(lr=0.05, eps=1e-8); }
  table a { rows 300; serving f32; }
  table d { rows 500; dim 16; serving int8; }
  table e { rows 64; dim 5; serving int4; optimizer adam(lr=0.01); }
  feature fa -> a pooling sum;
  feature fd -> d pooling mean;
}
"""
MODEL_WITH_FP8 = MODEL.replace(
    "  feature fa", "  table h { rows 90; dim 9; serving fp8; }\n  feature fh -> h pooling sum;\n"
    "  feature fa")
WAIT = 180.0  # seconds: generous, the machine is shared and small
