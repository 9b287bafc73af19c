// RUN: ekko-opt %s | ekko-opt | filecheck %s
// RUN: ekko-opt %s --print-op-generic | ekko-opt | filecheck %s
// RUN: ekko-opt %s --print-op-generic | filecheck %s --check-prefix=GENERIC

// CHECK: builtin.module {
// kern.update: every optimizer and every optional operand group
func.func @update(%t: memref<1000x64xf32>, %h: memref<1000x64xf16>, %b: memref<?x64xbf16>, %m: memref<1000x1xf32>, %s: memref<1000x64xf32>, %s2: memref<1000x64xf32>, %ids: memref<?xi64>, %ids32: memref<?xi32>, %g: memref<?x64xf32>, %q8: memref<1000x72xi8>, %q4: memref<1000x36xi8>, %sh: memref<1000x64xf16>, %v: memref<1000xi64>, %version: i64, %step: i64, %seed: i64) {
// CHECK-NEXT: func.func @update(%t: memref<1000x64xf32>, %h: memref<1000x64xf16>, %b: memref<?x64xbf16>, %m: memref<1000x1xf32>, %s: memref<1000x64xf32>, %s2: memref<1000x64xf32>, %ids: memref<?xi64>, %ids32: memref<?xi32>, %g: memref<?x64xf32>, %q8: memref<1000x72xi8>, %q4: memref<1000x36xi8>, %sh: memref<1000x64xf16>, %v: memref<1000xi64>, %version: i64, %step: i64, %seed: i64) {
  kern.update %t, %ids, %g {optimizer = "sgd", lr = 1.000000e-01 : f64} : memref<1000x64xf32>, memref<?xi64>, memref<?x64xf32>
// CHECK-NEXT: kern.update %t, %ids, %g {optimizer = "sgd", lr = 1.000000e-01 : f64} : memref<1000x64xf32>, memref<?xi64>, memref<?x64xf32>
  kern.update %t, %s, %ids32, %g, %step {optimizer = "adagrad", lr = 1.000000e-02 : f64, eps = 1.000000e-10 : f64, lr_decay = 0.000000e+00 : f64, dedup, step} : memref<1000x64xf32>, memref<1000x64xf32>, memref<?xi32>, memref<?x64xf32>, i64
// CHECK-NEXT: kern.update %t, %s, %ids32, %g, %step {optimizer = "adagrad", lr = 1.000000e-02 : f64, eps = 1.000000e-10 : f64, lr_decay = 0.000000e+00 : f64, dedup, step} : memref<1000x64xf32>, memref<1000x64xf32>, memref<?xi32>, memref<?x64xf32>, i64
  kern.update %b, %m, %ids, %g {optimizer = "rowwise_adagrad", lr = 1.000000e-02 : f64, eps = 1.000000e-08 : f64, dedup} : memref<?x64xbf16>, memref<1000x1xf32>, memref<?xi64>, memref<?x64xf32>
// CHECK-NEXT: kern.update %b, %m, %ids, %g {optimizer = "rowwise_adagrad", lr = 1.000000e-02 : f64, eps = 1.000000e-08 : f64, dedup} : memref<?x64xbf16>, memref<1000x1xf32>, memref<?xi64>, memref<?x64xf32>
  kern.update %t, %s, %s2, %ids, %g, %step {optimizer = "adam", lr = 1.000000e-03 : f64, beta1 = 9.000000e-01 : f64, beta2 = 9.990000e-01 : f64, eps = 1.000000e-08 : f64, dedup, step} : memref<1000x64xf32>, memref<1000x64xf32>, memref<1000x64xf32>, memref<?xi64>, memref<?x64xf32>, i64
// CHECK-NEXT: kern.update %t, %s, %s2, %ids, %g, %step {optimizer = "adam", lr = 1.000000e-03 : f64, beta1 = 9.000000e-01 : f64, beta2 = 9.990000e-01 : f64, eps = 1.000000e-08 : f64, dedup, step} : memref<1000x64xf32>, memref<1000x64xf32>, memref<1000x64xf32>, memref<?xi64>, memref<?x64xf32>, i64
  kern.update %t, %m, %ids, %g, %q8 {optimizer = "rowwise_adagrad", lr = 1.000000e-02 : f64, dedup, serving, serving_layout = #emb.layout<int8>} : memref<1000x64xf32>, memref<1000x1xf32>, memref<?xi64>, memref<?x64xf32>, memref<1000x72xi8>
// CHECK-NEXT: kern.update %t, %m, %ids, %g, %q8 {optimizer = "rowwise_adagrad", lr = 1.000000e-02 : f64, dedup, serving, serving_layout = #emb.layout<int8>} : memref<1000x64xf32>, memref<1000x1xf32>, memref<?xi64>, memref<?x64xf32>, memref<1000x72xi8>
  kern.update %t, %ids, %g, %q4 {optimizer = "sgd", lr = 1.000000e-01 : f64, serving, serving_layout = #emb.layout<int4>} : memref<1000x64xf32>, memref<?xi64>, memref<?x64xf32>, memref<1000x36xi8>
// CHECK-NEXT: kern.update %t, %ids, %g, %q4 {optimizer = "sgd", lr = 1.000000e-01 : f64, serving, serving_layout = #emb.layout<int4>} : memref<1000x64xf32>, memref<?xi64>, memref<?x64xf32>, memref<1000x36xi8>
  kern.update %t, %ids, %g, %sh {optimizer = "sgd", lr = 1.000000e-01 : f64, serving, serving_layout = #emb.layout<f16>} : memref<1000x64xf32>, memref<?xi64>, memref<?x64xf32>, memref<1000x64xf16>
// CHECK-NEXT: kern.update %t, %ids, %g, %sh {optimizer = "sgd", lr = 1.000000e-01 : f64, serving, serving_layout = #emb.layout<f16>} : memref<1000x64xf32>, memref<?xi64>, memref<?x64xf32>, memref<1000x64xf16>
  kern.update %t, %ids, %g, %v, %version {optimizer = "sgd", lr = 1.000000e-01 : f64, versions} : memref<1000x64xf32>, memref<?xi64>, memref<?x64xf32>, memref<1000xi64>, i64
// CHECK-NEXT: kern.update %t, %ids, %g, %v, %version {optimizer = "sgd", lr = 1.000000e-01 : f64, versions} : memref<1000x64xf32>, memref<?xi64>, memref<?x64xf32>, memref<1000xi64>, i64
  kern.update %h, %ids, %g, %seed {optimizer = "sgd", lr = 1.000000e-01 : f64, stochastic_rounding, seed} : memref<1000x64xf16>, memref<?xi64>, memref<?x64xf32>, i64
// CHECK-NEXT: kern.update %h, %ids, %g, %seed {optimizer = "sgd", lr = 1.000000e-01 : f64, stochastic_rounding, seed} : memref<1000x64xf16>, memref<?xi64>, memref<?x64xf32>, i64
  kern.update %h, %s, %ids32, %g, %q8, %v, %version, %step, %seed {optimizer = "adagrad", lr = 1.000000e-02 : f64, weight_decay = 1.000000e-04 : f64, max_norm = 1.000000e+00 : f64, clip_value = 5.000000e+00 : f64, dedup, stochastic_rounding, serving, versions, step, seed, order = "id", partitions = 4 : i64, tile = 16 : i64, serving_layout = #emb.layout<int8>} : memref<1000x64xf16>, memref<1000x64xf32>, memref<?xi32>, memref<?x64xf32>, memref<1000x72xi8>, memref<1000xi64>, i64, i64, i64
// CHECK-NEXT: kern.update %h, %s, %ids32, %g, %q8, %v, %version, %step, %seed {optimizer = "adagrad", lr = 1.000000e-02 : f64, weight_decay = 1.000000e-04 : f64, max_norm = 1.000000e+00 : f64, clip_value = 5.000000e+00 : f64, dedup, stochastic_rounding, serving, versions, step, seed, order = "id", partitions = 4 : i64, tile = 16 : i64, serving_layout = #emb.layout<int8>} : memref<1000x64xf16>, memref<1000x64xf32>, memref<?xi32>, memref<?x64xf32>, memref<1000x72xi8>, memref<1000xi64>, i64, i64, i64
  func.return
// CHECK-NEXT: func.return
}
// CHECK-NEXT: }

// kern.bag: every mode and layout, weighted, i32 and i64 ids
func.func @bag(%f32: memref<1000x64xf32>, %f16: memref<1000x64xf16>, %bf16: memref<?x64xbf16>, %int8: memref<1000x72xi8>, %int4: memref<1000x36xi8>, %int4odd: memref<?x36xi8>, %ids: memref<?xi64>, %off: memref<?xi64>, %ids32: memref<?xi32>, %off32: memref<?xi32>, %w: memref<?xf32>, %out: memref<?x64xf32>, %out63: memref<?x63xf32>) {
// CHECK-NEXT: func.func @bag(%f32: memref<1000x64xf32>, %f16: memref<1000x64xf16>, %bf16: memref<?x64xbf16>, %int8: memref<1000x72xi8>, %int4: memref<1000x36xi8>, %int4odd: memref<?x36xi8>, %ids: memref<?xi64>, %off: memref<?xi64>, %ids32: memref<?xi32>, %off32: memref<?xi32>, %w: memref<?xf32>, %out: memref<?x64xf32>, %out63: memref<?x63xf32>) {
  kern.bag %f32, %ids, %off, %out {layout = #emb.layout<f32>, mode = "sum"} : memref<1000x64xf32>, memref<?xi64>, memref<?xi64>, memref<?x64xf32>
// CHECK-NEXT: kern.bag %f32, %ids, %off, %out {layout = #emb.layout<f32>, mode = "sum"} : memref<1000x64xf32>, memref<?xi64>, memref<?xi64>, memref<?x64xf32>
  kern.bag %f16, %ids32, %off32, %out {layout = #emb.layout<f16>, mode = "mean"} : memref<1000x64xf16>, memref<?xi32>, memref<?xi32>, memref<?x64xf32>
// CHECK-NEXT: kern.bag %f16, %ids32, %off32, %out {layout = #emb.layout<f16>, mode = "mean"} : memref<1000x64xf16>, memref<?xi32>, memref<?xi32>, memref<?x64xf32>
  kern.bag %bf16, %ids, %out {layout = #emb.layout<bf16>, mode = "none"} : memref<?x64xbf16>, memref<?xi64>, memref<?x64xf32>
// CHECK-NEXT: kern.bag %bf16, %ids, %out {layout = #emb.layout<bf16>, mode = "none"} : memref<?x64xbf16>, memref<?xi64>, memref<?x64xf32>
  kern.bag %int8, %ids, %off, %w, %out {layout = #emb.layout<int8>, mode = "sum", weighted} : memref<1000x72xi8>, memref<?xi64>, memref<?xi64>, memref<?xf32>, memref<?x64xf32>
// CHECK-NEXT: kern.bag %int8, %ids, %off, %w, %out {layout = #emb.layout<int8>, mode = "sum", weighted} : memref<1000x72xi8>, memref<?xi64>, memref<?xi64>, memref<?xf32>, memref<?x64xf32>
  kern.bag %int4, %ids32, %out {layout = #emb.layout<int4>, mode = "none", partitions = 2 : i64} : memref<1000x36xi8>, memref<?xi32>, memref<?x64xf32>
// CHECK-NEXT: kern.bag %int4, %ids32, %out {layout = #emb.layout<int4>, mode = "none", partitions = 2 : i64} : memref<1000x36xi8>, memref<?xi32>, memref<?x64xf32>
  kern.bag %int4odd, %ids, %off, %out63 {layout = #emb.layout<int4>, mode = "sum", partitions = 2 : i64} : memref<?x36xi8>, memref<?xi64>, memref<?xi64>, memref<?x63xf32>
// CHECK-NEXT: kern.bag %int4odd, %ids, %off, %out63 {layout = #emb.layout<int4>, mode = "sum", partitions = 2 : i64} : memref<?x36xi8>, memref<?xi64>, memref<?xi64>, memref<?x63xf32>
  func.return
// CHECK-NEXT: func.return
}
// CHECK-NEXT: }
// CHECK-NEXT: }

// The generic form spells out the inferred result types.
// GENERIC: "kern.update"(%h, %s, %ids32, %g, %q8, %v, %version, %step, %seed) <{optimizer = "adagrad", hyper = {lr = 1.000000e-02 : f64}, weight_decay = 1.000000e-04 : f64, max_norm = 1.000000e+00 : f64, clip_value = 5.000000e+00 : f64, dedup, stochastic_rounding, order = "id", partitions = 4 : i64, tile = 16 : i64, serving_layout = #emb.layout<int8>, operandSegmentSizes = array<i32: 1, 1, 1, 1, 1, 1, 1, 1, 1>}> : (memref<1000x64xf16>, memref<1000x64xf32>, memref<?xi32>, memref<?x64xf32>, memref<1000x72xi8>, memref<1000xi64>, i64, i64, i64) -> ()
// GENERIC: "kern.bag"(%int4odd, %ids, %off, %out63) <{layout = #emb.layout<int4>, mode = "sum", partitions = 2 : i64, operandSegmentSizes = array<i32: 1, 1, 1, 0, 1>}> : (memref<?x36xi8>, memref<?xi64>, memref<?xi64>, memref<?x63xf32>) -> ()
