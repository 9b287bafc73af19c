// RUN: ekko-opt %s --split-input-file --verify-diagnostics -p lower-to-kernel | filecheck %s
// RUN: not ekko-opt %s -p lower-to-kernel 2>&1 | filecheck %s --check-prefix=LOC

// Tables, state, serving copies and versions become buffers updated in
// place; the function returns nothing. kern.update carries the per-row math
// traced from the optimizer catalog: element values are f32, kern.row_sum
// reduces over the row, the step and hyper-parameters arrive as f64. An int4 serving copy of dim 64 is
// 32 bytes of nibbles + f16 scale and bias = 36 bytes a row.

// CHECK-LABEL: func.func @train(%t: memref<1000x64xf32>, %m: memref<1000x1xf32>, %ids: memref<?xi64>, %rows: memref<?x64xf32>, %q: memref<1000x36xi8>, %v: memref<1000xi64>, %ver: i64) {
// CHECK-NEXT:    kern.update %t, %m, %ids, %rows, %q, %v, %ver {optimizer = "rowwise_adagrad", lr = 1.000000e-02 : f64, dedup, serving, versions, order = "bucket", partitions = 2 : i64, tile = 16 : i64, serving_layout = #emb.layout<int4>} : memref<1000x64xf32>, memref<1000x1xf32>, memref<?xi64>, memref<?x64xf32>, memref<1000x36xi8>, memref<1000xi64>, i64 {
// CHECK-NEXT:  ^bb0(%g: f32, %w: f32, %momentum: f32, %step: f64, %lr: f64, %eps: f64):
// CHECK-NEXT:  %0 = arith.mulf %g, %g : f32
// CHECK-NEXT:  %1 = kern.row_sum %0
// CHECK-NEXT:  %2 = arith.constant 6.400000e+01 : f64
// CHECK-NEXT:  %3 = arith.truncf %2 : f64 to f32
// CHECK-NEXT:  %4 = arith.divf %1, %3 : f32
// CHECK-NEXT:  %5 = arith.addf %momentum, %4 : f32
// CHECK-NEXT:  %6 = math.sqrt %5 : f32
// CHECK-NEXT:  %7 = arith.truncf %eps : f64 to f32
// CHECK-NEXT:  %8 = arith.addf %6, %7 : f32
// CHECK-NEXT:  %9 = arith.truncf %lr : f64 to f32
// CHECK-NEXT:  %10 = arith.divf %9, %8 : f32
// CHECK-NEXT:  %11 = arith.mulf %10, %g : f32
// CHECK-NEXT:  %12 = arith.subf %w, %11 : f32
// CHECK-NEXT:  kern.yield %12, %5 : f32, f32
// CHECK-NEXT:  }
// CHECK-NEXT:    func.return
// CHECK-NEXT:  }
func.func @train(%t: !emb.table<1000x64xf32>, %m: !emb.state<1000x1>, %ids: tensor<?xi64>, %rows: tensor<?x64xf32>, %q: !emb.table<1000x64xint4>, %v: !emb.versions<1000>, %ver: i64) -> (!emb.table<1000x64xf32>, !emb.state<1000x1>, !emb.table<1000x64xint4>, !emb.versions<1000>) {
  %d = upd.delta %ids, %rows : tensor<?xi64>, tensor<?x64xf32>
  %t2, %m2, %q2, %v2 = upd.apply %t, %m, %d, %q, %v, %ver {optimizer = "rowwise_adagrad", lr = 0.01 : f64, dedup, serving, versions, order = "bucket", partitions = 2 : i64, tile = 16 : i64} : !emb.table<1000x64xf32>, !emb.state<1000x1>, !upd.delta<64xf32, i64>, !emb.table<1000x64xint4>, !emb.versions<1000>, i64
  func.return %t2, %m2, %q2, %v2 : !emb.table<1000x64xf32>, !emb.state<1000x1>, !emb.table<1000x64xint4>, !emb.versions<1000>
}

// A delta argument becomes two buffers named after it (%d_ids, %d_rows);
// dynamic rows stay dynamic.

// CHECK-LABEL: func.func @delta_arg(%t: memref<?x8xbf16>, %s: memref<?x8xf32>, %d_ids: memref<?xi32>, %d_rows: memref<?x8xf32>, %step: i64, %seed: i64) {
// CHECK-NEXT:    kern.update %t, %s, %d_ids, %d_rows, %step, %seed {optimizer = "adagrad", lr = 1.000000e-02 : f64, stochastic_rounding, step, seed} : memref<?x8xbf16>, memref<?x8xf32>, memref<?xi32>, memref<?x8xf32>, i64, i64 {
// CHECK-NEXT:  ^bb0(%g: f32, %w: f32, %sum: f32, %step_1: f64, %lr: f64, %eps: f64, %lr_decay: f64):
// CHECK-NEXT:  %0 = arith.constant 1.000000e+00 : f64
// CHECK-NEXT:  %1 = arith.subf %step_1, %0 : f64
// CHECK-NEXT:  %2 = arith.mulf %1, %lr_decay : f64
// CHECK-NEXT:  %3 = arith.addf %0, %2 : f64
// CHECK-NEXT:  %4 = arith.divf %lr, %3 : f64
// CHECK-NEXT:  %5 = arith.mulf %g, %g : f32
// CHECK-NEXT:  %6 = arith.addf %sum, %5 : f32
// CHECK-NEXT:  %7 = arith.truncf %4 : f64 to f32
// CHECK-NEXT:  %8 = arith.mulf %7, %g : f32
// CHECK-NEXT:  %9 = math.sqrt %6 : f32
// CHECK-NEXT:  %10 = arith.truncf %eps : f64 to f32
// CHECK-NEXT:  %11 = arith.addf %9, %10 : f32
// CHECK-NEXT:  %12 = arith.divf %8, %11 : f32
// CHECK-NEXT:  %13 = arith.subf %w, %12 : f32
// CHECK-NEXT:  kern.yield %13, %6 : f32, f32
// CHECK-NEXT:  }
// CHECK-NEXT:    func.return
func.func @delta_arg(%t: !emb.table<?x8xbf16>, %s: !emb.state<?x8>, %d: !upd.delta<8xf32, i32, unique>, %step: i64, %seed: i64) -> !emb.table<?x8xbf16> {
  %t2, %s2 = upd.apply %t, %s, %d, %step, %seed {optimizer = "adagrad", lr = 0.01 : f64, stochastic_rounding, step, seed} : !emb.table<?x8xbf16>, !emb.state<?x8>, !upd.delta<8xf32, i32, unique>, i64, i64
  func.return %t2 : !emb.table<?x8xbf16>
}

// Each bag or lookup result becomes an output buffer argument; a lookup is
// a kern.bag of mode "none" (no offsets). int8 rows of dim 64: 64 + 8 bytes.

// CHECK-LABEL: func.func @serve(%q: memref<1000x72xi8>, %ids: memref<?xi32>, %off: memref<?xi32>, %w: memref<?xf32>, %pooled_out: memref<?x64xf32>, %mean_out: memref<?x64xf32>, %rows_out: memref<?x64xf32>) {
// CHECK-NEXT:    kern.bag %q, %ids, %off, %w, %pooled_out {layout = #emb.layout<int8>, mode = "sum", weighted, partitions = 2 : i64} : memref<1000x72xi8>, memref<?xi32>, memref<?xi32>, memref<?xf32>, memref<?x64xf32>
// CHECK-NEXT:    kern.bag %q, %ids, %off, %mean_out {layout = #emb.layout<int8>, mode = "mean"} : memref<1000x72xi8>, memref<?xi32>, memref<?xi32>, memref<?x64xf32>
// CHECK-NEXT:    kern.bag %q, %ids, %rows_out {layout = #emb.layout<int8>, mode = "none"} : memref<1000x72xi8>, memref<?xi32>, memref<?x64xf32>
// CHECK-NEXT:    func.return
func.func @serve(%q: !emb.table<1000x64xint8>, %ids: tensor<?xi32>, %off: tensor<?xi32>, %w: tensor<?xf32>) -> (tensor<?x64xf32>, tensor<?x64xf32>, tensor<?x64xf32>) {
  %pooled = emb.bag %q, %ids, %off, %w {mode = "sum", partitions = 2 : i64} : !emb.table<1000x64xint8>, tensor<?xi32>, tensor<?xi32>, tensor<?xf32>
  %mean = emb.bag %q, %ids, %off {mode = "mean"} : !emb.table<1000x64xint8>, tensor<?xi32>, tensor<?xi32>
  %rows = emb.lookup %q, %ids : !emb.table<1000x64xint8>, tensor<?xi32>
  func.return %pooled, %mean, %rows : tensor<?x64xf32>, tensor<?x64xf32>, tensor<?x64xf32>
}

// Declarations and functions without ekko values are left alone.

// CHECK-LABEL: func.func private @decl(!emb.table<10x4xf32>) -> !emb.table<10x4xf32>
// CHECK-LABEL: func.func @untouched(%x: i64) -> i64 {
// CHECK-NEXT:    func.return %x : i64
func.func private @decl(%t: !emb.table<10x4xf32>) -> !emb.table<10x4xf32>
func.func @untouched(%x: i64) -> i64 {
  func.return %x : i64
}

// -----

// Updating in place is wrong when a later op reads the old table: an error
// that points at the reader (the first error of the whole file, for LOC).

// CHECK: 'upd.apply' updates its table in place, but 'emb.lookup' reads the old value afterwards
// LOC: lower-to-kernel.mlir:[[# @LINE + 4]]:3: error: 'upd.apply' updates its table in place, but 'emb.lookup' reads the old value afterwards
// LOC-NEXT: %old = emb.lookup %t, %ids
func.func @reads_old(%t: !emb.table<100x8xf32>, %d: !upd.delta<8xf32, i64>, %ids: tensor<?xi64>) -> (!emb.table<100x8xf32>, tensor<?x8xf32>) {
  %t2 = upd.apply %t, %d {optimizer = "sgd", lr = 0.1 : f64} : !emb.table<100x8xf32>, !upd.delta<8xf32, i64>
  %old = emb.lookup %t, %ids : !emb.table<100x8xf32>, tensor<?xi64>
  func.return %t2, %old : !emb.table<100x8xf32>, tensor<?x8xf32>
}

// -----

// The same for the optimizer state and the serving copy.

// CHECK: 'upd.apply' updates its momentum in place, but 'upd.apply' reads the old value afterwards
func.func @state_reused(%t: !emb.table<100x8xf32>, %t1: !emb.table<100x8xf32>, %m: !emb.state<100x1>, %d: !upd.delta<8xf32, i64, unique>) -> (!emb.table<100x8xf32>, !emb.table<100x8xf32>) {
  %a, %am = upd.apply %t, %m, %d {optimizer = "rowwise_adagrad", lr = 0.01 : f64} : !emb.table<100x8xf32>, !emb.state<100x1>, !upd.delta<8xf32, i64, unique>
  %b, %bm = upd.apply %t1, %m, %d {optimizer = "rowwise_adagrad", lr = 0.01 : f64} : !emb.table<100x8xf32>, !emb.state<100x1>, !upd.delta<8xf32, i64, unique>
  func.return %a, %b : !emb.table<100x8xf32>, !emb.table<100x8xf32>
}

// -----

// CHECK: 'upd.apply' updates its serving in place, but 'emb.bag' reads the old value afterwards
func.func @serving_read(%t: !emb.table<100x8xf32>, %q: !emb.table<100x8xint8>, %d: !upd.delta<8xf32, i64>, %ids: tensor<?xi64>) -> (!emb.table<100x8xint8>, tensor<?x8xf32>) {
  %t2, %q2 = upd.apply %t, %d, %q {optimizer = "sgd", lr = 0.1 : f64, serving} : !emb.table<100x8xf32>, !upd.delta<8xf32, i64>, !emb.table<100x8xint8>
  %r = emb.bag %q, %ids, %ids {mode = "sum"} : !emb.table<100x8xint8>, tensor<?xi64>, tensor<?xi64>
  func.return %q2, %r : !emb.table<100x8xint8>, tensor<?x8xf32>
}

// -----

// Reading the table before the update is fine.

// CHECK-LABEL: func.func @reads_before
// CHECK-NEXT:    kern.bag %t, %ids, %r_out {layout = #emb.layout<f32>, mode = "none"}
// CHECK-NEXT:    kern.update %t, %d_ids, %d_rows {optimizer = "sgd", lr = 1.000000e-01 : f64}
func.func @reads_before(%t: !emb.table<100x8xf32>, %d: !upd.delta<8xf32, i64>, %ids: tensor<?xi64>) -> (!emb.table<100x8xf32>, tensor<?x8xf32>) {
  %r = emb.lookup %t, %ids : !emb.table<100x8xf32>, tensor<?xi64>
  %t2 = upd.apply %t, %d {optimizer = "sgd", lr = 0.1 : f64} : !emb.table<100x8xf32>, !upd.delta<8xf32, i64>
  func.return %t2, %r : !emb.table<100x8xf32>, tensor<?x8xf32>
}

// -----

// Update ops that upd-fuse has not turned into upd.apply cannot be lowered.

// CHECK: 'upd.sgd' is not fused: run upd-dedup and upd-fuse before lower-to-kernel
func.func @unfused(%t: !emb.table<100x8xf32>, %d: !upd.delta<8xf32, i64>) -> !emb.table<100x8xf32> {
  %t2 = upd.sgd %t, %d {lr = 0.1 : f64} : !emb.table<100x8xf32>, !upd.delta<8xf32, i64>
  func.return %t2 : !emb.table<100x8xf32>
}

// -----

// CHECK: 'upd.dedup' is not fused: run upd-dedup and upd-fuse before lower-to-kernel
func.func @unfused_chain(%t: !emb.table<100x8xf32>, %d: !upd.delta<8xf32, i64>) -> !upd.delta<8xf32, i64, unique> {
  %u = upd.dedup %d : !upd.delta<8xf32, i64>
  func.return %u : !upd.delta<8xf32, i64, unique>
}
