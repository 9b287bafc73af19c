"""The small model the engine-on-Ray and durable-log tests share, and how long they wait."""

MODEL = """
model small {
  defaults { dim 8; dtype f32; optimizer rowwise_adagrad(lr=0.05, eps=1e-8); }
  table a { rows 300; serving f32; }
  table d { rows 500; dim 16; serving int8; }
  table e { rows 64; dim 5; serving int4; optimizer adam(lr=0.01); }
  table h { rows 90; dim 9; serving fp8; }
  feature fa -> a pooling sum;
  feature fd -> d pooling mean;
  feature fh -> h pooling sum;
}
"""
WAIT = 180.0  # seconds: generous, the machine is shared and small
