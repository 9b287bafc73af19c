// RUN: ekko-opt %s --split-input-file --verify-diagnostics --parsing-diagnostics | filecheck %s

// kern.update

// CHECK: the momentum state buffer must have rows of 1, got memref<10x4xf32>
%t, %m, %ids, %g = "test.op"() : () -> (memref<10x4xf32>, memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>)
kern.update %t, %m, %ids, %g {optimizer = "rowwise_adagrad", dedup} : memref<10x4xf32>, memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>

// -----

// The math region: its arguments follow the catalog (g, w, state, step, hyper).

// CHECK: 'kern.update' math region must take (g, w, step, lr) typed (f32, f32, f64, f64)
%t, %ids, %g = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>)
kern.update %t, %ids, %g {optimizer = "sgd"} : memref<10x4xf32>, memref<?xi64>, memref<?x4xf32> {
^bb0(%x: f32, %w: f32):
  "kern.yield"(%w) : (f32) -> ()
}

// -----

// CHECK: 'kern.update' math region must yield 1 f32 values: the new weights and state
%t, %ids, %g = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>)
kern.update %t, %ids, %g {optimizer = "sgd"} : memref<10x4xf32>, memref<?xi64>, memref<?x4xf32> {
^bb0(%x: f32, %w: f32, %step: f64, %lr: f64):
  "kern.yield"(%w, %x) : (f32, f32) -> ()
}

// -----

// CHECK: optimizer rowwise_adagrad: rowwise state 'momentum' must be one value per row (reduce element values with row_sum)
%t, %m, %ids, %g = "test.op"() : () -> (memref<10x4xf32>, memref<10x1xf32>, memref<?xi64>, memref<?x4xf32>)
kern.update %t, %m, %ids, %g {optimizer = "rowwise_adagrad", dedup} : memref<10x4xf32>, memref<10x1xf32>, memref<?xi64>, memref<?x4xf32> {
^bb0(%x: f32, %w: f32, %mom: f32, %step: f64, %lr: f64, %eps: f64):
  %sq = "arith.mulf"(%x, %x) : (f32, f32) -> f32
  "kern.yield"(%w, %sq) : (f32, f32) -> ()
}

// -----

// CHECK: 'arith.addi' is not allowed in a math region
%t, %ids, %g = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>)
kern.update %t, %ids, %g {optimizer = "sgd"} : memref<10x4xf32>, memref<?xi64>, memref<?x4xf32> {
^bb0(%x: f32, %w: f32, %step: f64, %lr: f64):
  %c = "arith.constant"() <{value = 1 : i64}> : () -> i64
  %d = "arith.addi"(%c, %c) : (i64, i64) -> i64
  "kern.yield"(%w) : (f32) -> ()
}

// -----


// CHECK: 'kern.update' needs a known optimizer
%t, %ids, %g = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>)
kern.update %t, %ids, %g {optimizer = "lamb"} : memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>

// -----

// CHECK: 'kern.update' needs a known optimizer
%t, %ids, %g = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>)
kern.update %t, %ids, %g {lr = 0.1 : f64} : memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>

// -----

// CHECK: 'kern.update' operands must be (table, momentum, ids, grads)
%t, %ids, %g = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>)
kern.update %t, %ids, %g {optimizer = "rowwise_adagrad", lr = 0.1 : f64} : memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>

// -----

// CHECK: 'kern.update' has no attribute 'momentum'
%t, %ids, %g = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>)
kern.update %t, %ids, %g {optimizer = "sgd", lr = 0.1 : f64, momentum = 0.9 : f64} : memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>

// -----

// CHECK: the table buffer must be a rank-2 memref, got memref<?xf32>
%t, %ids, %g = "test.op"() : () -> (memref<?xf32>, memref<?xi64>, memref<?x4xf32>)
kern.update %t, %ids, %g {optimizer = "sgd", lr = 0.1 : f64} : memref<?xf32>, memref<?xi64>, memref<?x4xf32>

// -----

// CHECK: the table buffer must hold f32, f16 or bf16
%t, %ids, %g = "test.op"() : () -> (memref<10x4xi8>, memref<?xi64>, memref<?x4xf32>)
kern.update %t, %ids, %g {optimizer = "sgd", lr = 0.1 : f64} : memref<10x4xi8>, memref<?xi64>, memref<?x4xf32>

// -----

// CHECK: the ids buffer must be a rank-1 memref, got tensor<?xi64>
%t, %ids, %g = "test.op"() : () -> (memref<10x4xf32>, tensor<?xi64>, memref<?x4xf32>)
kern.update %t, %ids, %g {optimizer = "sgd", lr = 0.1 : f64} : memref<10x4xf32>, tensor<?xi64>, memref<?x4xf32>

// -----

// CHECK: the ids buffer must hold i32 or i64
%t, %ids, %g = "test.op"() : () -> (memref<10x4xf32>, memref<?xi16>, memref<?x4xf32>)
kern.update %t, %ids, %g {optimizer = "sgd", lr = 0.1 : f64} : memref<10x4xf32>, memref<?xi16>, memref<?x4xf32>

// -----

// CHECK: the grads buffer must be memref<?x4xf32>
%t, %ids, %g = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?x8xf32>)
kern.update %t, %ids, %g {optimizer = "sgd", lr = 0.1 : f64} : memref<10x4xf32>, memref<?xi64>, memref<?x8xf32>

// -----

// CHECK: the grads buffer must be memref<?x4xf32>
%t, %ids, %g = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?x4xf16>)
kern.update %t, %ids, %g {optimizer = "sgd", lr = 0.1 : f64} : memref<10x4xf32>, memref<?xi64>, memref<?x4xf16>

// -----

// CHECK: 'kern.update' with a serving copy needs serving_layout = #emb.layout<NAME>
%t, %ids, %g, %q = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>, memref<10x12xi8>)
kern.update %t, %ids, %g, %q {optimizer = "sgd", lr = 0.1 : f64, serving} : memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>, memref<10x12xi8>

// -----

// CHECK: the serving buffer must be a rank-2 memref, got memref<?xi8>
%t, %ids, %g, %q = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>, memref<?xi8>)
kern.update %t, %ids, %g, %q {optimizer = "sgd", lr = 0.1 : f64, serving, serving_layout = #emb.layout<int8>} : memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>, memref<?xi8>

// -----

// CHECK: the int8 serving buffer must be 10x12, got memref<10x4xi8>
%t, %ids, %g, %q = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>, memref<10x4xi8>)
kern.update %t, %ids, %g, %q {optimizer = "sgd", lr = 0.1 : f64, serving, serving_layout = #emb.layout<int8>} : memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>, memref<10x4xi8>

// -----

// CHECK: the int4 serving buffer must be 10x6, got memref<10x4xi8>
%t, %ids, %g, %q = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>, memref<10x4xi8>)
kern.update %t, %ids, %g, %q {optimizer = "sgd", lr = 0.1 : f64, serving, serving_layout = #emb.layout<int4>} : memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>, memref<10x4xi8>

// -----

// CHECK: 'kern.update' step must be i64
%t, %s, %ids, %g, %step = "test.op"() : () -> (memref<10x4xf32>, memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>, i32)
kern.update %t, %s, %ids, %g, %step {optimizer = "adagrad", lr = 0.1 : f64, step} : memref<10x4xf32>, memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>, i32

// -----

// CHECK: 'kern.update' version must be i64
%t, %ids, %g, %v, %n = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>, memref<10xi64>, index)
kern.update %t, %ids, %g, %v, %n {optimizer = "sgd", lr = 0.1 : f64, versions} : memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>, memref<10xi64>, index

// -----

// CHECK: 'kern.update' seed must be i64
%t, %ids, %g, %seed = "test.op"() : () -> (memref<10x4xf16>, memref<?xi64>, memref<?x4xf32>, f32)
kern.update %t, %ids, %g, %seed {optimizer = "sgd", lr = 0.1 : f64, stochastic_rounding, seed} : memref<10x4xf16>, memref<?xi64>, memref<?x4xf32>, f32

// -----

// The custom form reports the same errors while parsing.

// CHECK: 'kern.update' operands must be (table, ids, grads, serving)
%t, %ids, %g = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>)
kern.update %t, %ids, %g {optimizer = "sgd", lr = 0.1 : f64, serving, serving_layout = #emb.layout<int8>} : memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>

// -----

// kern.bag

// CHECK: 'kern.bag' needs mode = "sum", "mean" or "none"
%t, %ids, %off, %out = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?xi64>, memref<?x4xf32>)
kern.bag %t, %ids, %off, %out {layout = #emb.layout<f32>, mode = "max"} : memref<10x4xf32>, memref<?xi64>, memref<?xi64>, memref<?x4xf32>

// -----

// CHECK: 'kern.bag' operands must be (table, ids, out)
%t, %ids, %off, %out = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?xi64>, memref<?x4xf32>)
kern.bag %t, %ids, %off, %out {layout = #emb.layout<f32>, mode = "none"} : memref<10x4xf32>, memref<?xi64>, memref<?xi64>, memref<?x4xf32>

// -----

// CHECK: 'kern.bag' operands must be (table, ids, offsets, weights, out)
%t, %ids, %off, %out = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?xi64>, memref<?x4xf32>)
kern.bag %t, %ids, %off, %out {layout = #emb.layout<f32>, mode = "sum", weighted} : memref<10x4xf32>, memref<?xi64>, memref<?xi64>, memref<?x4xf32>

// -----

// CHECK: unknown layout 'int2'; expected one of f32, f16, bf16, int8, int4, fp8
%t, %ids, %off, %out = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?xi64>, memref<?x4xf32>)
kern.bag %t, %ids, %off, %out {layout = #emb.layout<int2>, mode = "sum"} : memref<10x4xf32>, memref<?xi64>, memref<?xi64>, memref<?x4xf32>

// -----

// CHECK: 'kern.bag' needs layout = #emb.layout<NAME>
%t, %ids, %off, %out = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?xi64>, memref<?x4xf32>)
kern.bag %t, %ids, %off, %out {layout = "f32", mode = "sum"} : memref<10x4xf32>, memref<?xi64>, memref<?xi64>, memref<?x4xf32>

// -----

// CHECK: unknown layout 'int2'; expected one of f32, f16, bf16, int8, int4, fp8
%t, %ids, %g, %q = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>, memref<10x12xi8>)
kern.update %t, %ids, %g, %q {optimizer = "sgd", lr = 0.1 : f64, serving, serving_layout = #emb.layout<int2>} : memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>, memref<10x12xi8>

// -----

// CHECK: 'serving_layout' must be a layout, #emb.layout<NAME>, got "int8"
%t, %ids, %g, %q = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>, memref<10x12xi8>)
"kern.update"(%t, %ids, %g, %q) <{optimizer = "sgd", hyper = {lr = 0.1 : f64}, serving_layout = "int8", operandSegmentSizes = array<i32: 1, 0, 1, 1, 1, 0, 0, 0, 0>}> : (memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>, memref<10x12xi8>) -> ()

// -----

// CHECK: 'weighted' is a unit flag that says the weights operand is present, got 1 : i64
%t, %ids, %off, %w, %out = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?xi64>, memref<?xf32>, memref<?x4xf32>)
kern.bag %t, %ids, %off, %w, %out {layout = #emb.layout<f32>, mode = "sum", weighted = 1 : i64} : memref<10x4xf32>, memref<?xi64>, memref<?xi64>, memref<?xf32>, memref<?x4xf32>

// -----

// CHECK: the output buffer must be a rank-2 memref, got memref<?xf32>
%t, %ids, %off, %out = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?xi64>, memref<?xf32>)
kern.bag %t, %ids, %off, %out {layout = #emb.layout<f32>, mode = "sum"} : memref<10x4xf32>, memref<?xi64>, memref<?xi64>, memref<?xf32>

// -----

// CHECK: the table buffer must be a rank-2 memref, got memref<?xi8>
%t, %ids, %out = "test.op"() : () -> (memref<?xi8>, memref<?xi64>, memref<?x4xf32>)
kern.bag %t, %ids, %out {layout = #emb.layout<int8>, mode = "none"} : memref<?xi8>, memref<?xi64>, memref<?x4xf32>

// -----

// CHECK: a int8 table of dim 4 must have rows of 12, got memref<10x4xi8>
%t, %ids, %out = "test.op"() : () -> (memref<10x4xi8>, memref<?xi64>, memref<?x4xf32>)
kern.bag %t, %ids, %out {layout = #emb.layout<int8>, mode = "none"} : memref<10x4xi8>, memref<?xi64>, memref<?x4xf32>

// -----

// CHECK: a f16 table of dim 4 must have rows of 4, got memref<10x8xf16>
%t, %ids, %out = "test.op"() : () -> (memref<10x8xf16>, memref<?xi64>, memref<?x4xf32>)
kern.bag %t, %ids, %out {layout = #emb.layout<f16>, mode = "none"} : memref<10x8xf16>, memref<?xi64>, memref<?x4xf32>

// -----

// CHECK: the ids buffer must be a rank-1 memref, got memref<?x1xi64>
%t, %ids, %out = "test.op"() : () -> (memref<10x4xf32>, memref<?x1xi64>, memref<?x4xf32>)
kern.bag %t, %ids, %out {layout = #emb.layout<f32>, mode = "none"} : memref<10x4xf32>, memref<?x1xi64>, memref<?x4xf32>

// -----

// CHECK: the ids buffer must hold i32 or i64
%t, %ids, %out = "test.op"() : () -> (memref<10x4xf32>, memref<?xui64>, memref<?x4xf32>)
kern.bag %t, %ids, %out {layout = #emb.layout<f32>, mode = "none"} : memref<10x4xf32>, memref<?xui64>, memref<?x4xf32>

// -----

// What no backend compiles is refused here, not by a target later: per-sample
// weights scale the rows of a sum only (torch's embedding_bag agrees).

// CHECK: 'kern.bag' per-sample weights need mode "sum", got mode "mean"
%t, %ids, %off, %w, %out = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?xi64>, memref<?xf32>, memref<?x4xf32>)
kern.bag %t, %ids, %off, %w, %out {layout = #emb.layout<f32>, mode = "mean", weighted} : memref<10x4xf32>, memref<?xi64>, memref<?xi64>, memref<?xf32>, memref<?x4xf32>

// -----

// CHECK: 'kern.bag' per-sample weights need mode "sum", got mode "none"
%t, %ids, %w, %out = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?xf32>, memref<?x4xf32>)
kern.bag %t, %ids, %w, %out {layout = #emb.layout<f32>, mode = "none", weighted} : memref<10x4xf32>, memref<?xi64>, memref<?xf32>, memref<?x4xf32>

// -----

// CHECK: the output buffer must hold f32, got memref<?x4xf16>
%t, %ids, %out = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?x4xf16>)
kern.bag %t, %ids, %out {layout = #emb.layout<f32>, mode = "none"} : memref<10x4xf32>, memref<?xi64>, memref<?x4xf16>

// -----

// CHECK: the output buffer memref<?x?xf32> must have a static dim
%t, %ids, %out = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?x?xf32>)
kern.bag %t, %ids, %out {layout = #emb.layout<f32>, mode = "none"} : memref<10x4xf32>, memref<?xi64>, memref<?x?xf32>

// -----

// CHECK: 'kern.bag' dim must be at most 16,384, got 40,000 (MAX_DIM)
%t, %ids, %out = "test.op"() : () -> (memref<10x40000xf32>, memref<?xi64>, memref<?x40000xf32>)
kern.bag %t, %ids, %out {layout = #emb.layout<f32>, mode = "none"} : memref<10x40000xf32>, memref<?xi64>, memref<?x40000xf32>

// -----

// CHECK: a f16 table buffer must hold f16, got memref<10x4xf32>
%t, %ids, %out = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>)
kern.bag %t, %ids, %out {layout = #emb.layout<f16>, mode = "none"} : memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>

// -----

// CHECK: the offsets buffer must hold the ids' i64, got memref<?xi32>
%t, %ids, %off, %out = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?xi32>, memref<?x4xf32>)
kern.bag %t, %ids, %off, %out {layout = #emb.layout<f32>, mode = "sum"} : memref<10x4xf32>, memref<?xi64>, memref<?xi32>, memref<?x4xf32>

// -----

// CHECK: the weights buffer must hold f32, got memref<?xf64>
%t, %ids, %off, %w, %out = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?xi64>, memref<?xf64>, memref<?x4xf32>)
kern.bag %t, %ids, %off, %w, %out {layout = #emb.layout<f32>, mode = "sum", weighted} : memref<10x4xf32>, memref<?xi64>, memref<?xi64>, memref<?xf64>, memref<?x4xf32>

// -----

// The custom form reports the same errors while parsing.

// CHECK: 'kern.bag' operands must be (table, ids, out)
%t, %ids = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>)
kern.bag %t, %ids {layout = #emb.layout<f32>, mode = "none"} : memref<10x4xf32>, memref<?xi64>

// -----

// CHECK: 'kern.update' tile must be 1 to 16384, got 0
%t, %ids, %g = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>)
kern.update %t, %ids, %g {optimizer = "sgd", lr = 0.1 : f64, tile = 0 : i64} : memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>

// -----

// CHECK: 'kern.update' prefetch must be 1 to 256, got 300
%t, %ids, %g = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>)
kern.update %t, %ids, %g {optimizer = "sgd", lr = 0.1 : f64, prefetch = 300 : i64} : memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>

// -----

// CHECK: 'kern.bag' partitions must be 1 to 4096, got 5000
%t, %ids, %off, %out = "test.op"() : () -> (memref<10x4xf32>, memref<?xi64>, memref<?xi64>, memref<?x4xf32>)
kern.bag %t, %ids, %off, %out {layout = #emb.layout<f32>, mode = "sum", partitions = 5000 : i64} : memref<10x4xf32>, memref<?xi64>, memref<?xi64>, memref<?x4xf32>

// -----

// CHECK: 'seq' is a unit flag that says the seq operand is present, got 1 : i64
%q, %v, %s, %ids, %r, %pv = "test.op"() : () -> (memref<10x12xi8>, memref<10xi64>, memref<10xi32>, memref<?xi64>, memref<?x12xi8>, memref<?xi64>)
kern.pack %q, %v, %s, %ids, %r, %pv {layout = #emb.layout<int8>, dim = 4 : i64, seq = 1 : i64} : memref<10x12xi8>, memref<10xi64>, memref<10xi32>, memref<?xi64>, memref<?x12xi8>, memref<?xi64>

// -----

// CHECK: 'kern.update' dim must be at most 16,384, got 40,000 (MAX_DIM)
%t, %ids, %g = "test.op"() : () -> (memref<10x40000xf32>, memref<?xi64>, memref<?x40000xf32>)
kern.update %t, %ids, %g {optimizer = "sgd", lr = 0.1 : f64} : memref<10x40000xf32>, memref<?xi64>, memref<?x40000xf32>

// -----

// CHECK: 'kern.pack' dim must be at most 16,384, got 40,000 (MAX_DIM)
%q, %v, %ids, %r, %pv = "test.op"() : () -> (memref<10x40000xf32>, memref<10xi64>, memref<?xi64>, memref<?x40000xf32>, memref<?xi64>)
kern.pack %q, %v, %ids, %r, %pv {layout = #emb.layout<f32>, dim = 40000 : i64} : memref<10x40000xf32>, memref<10xi64>, memref<?xi64>, memref<?x40000xf32>, memref<?xi64>
