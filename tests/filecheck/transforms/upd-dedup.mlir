// RUN: ekko-opt %s -p upd-dedup | filecheck %s
// RUN: ekko-opt %s -p 'upd-dedup{deterministic=true}' | filecheck %s --check-prefix=DET

// A non-linear optimizer gets one upd.dedup right after the delta's source;
// the chain ops in between are retyped to the unique delta.

// CHECK-LABEL: func.func @rowwise
// CHECK-NEXT:    %d = upd.delta %ids, %rows : tensor<?xi64>, tensor<?x8xf32>
// CHECK-NEXT:    %d_1 = upd.dedup %d : !upd.delta<8xf32, i64>
// CHECK-NEXT:    %c = upd.clip %d_1 {max_norm = 1.000000e+00 : f64} : !upd.delta<8xf32, i64, unique>
// CHECK-NEXT:    %t2, %m2 = upd.rowwise_adagrad %t, %m, %c {lr = 1.000000e-02 : f64} : !emb.table<100x8xf32>, !emb.state<100x1>, !upd.delta<8xf32, i64, unique>
// CHECK-NEXT:    func.return %t2, %m2
func.func @rowwise(%t: !emb.table<100x8xf32>, %m: !emb.state<100x1>, %ids: tensor<?xi64>, %rows: tensor<?x8xf32>) -> (!emb.table<100x8xf32>, !emb.state<100x1>) {
  %d = upd.delta %ids, %rows : tensor<?xi64>, tensor<?x8xf32>
  %c = upd.clip %d {max_norm = 1.0 : f64} : !upd.delta<8xf32, i64>
  %t2, %m2 = upd.rowwise_adagrad %t, %m, %c {lr = 0.01 : f64} : !emb.table<100x8xf32>, !emb.state<100x1>, !upd.delta<8xf32, i64>
  func.return %t2, %m2 : !emb.table<100x8xf32>, !emb.state<100x1>
}

// A delta argument (i32 ids) is deduplicated at the top of the body.

// CHECK-LABEL: func.func @arg
// CHECK-NEXT:    %d_1 = upd.dedup %d : !upd.delta<8xf32, i32>
// CHECK-NEXT:    %t2, %s2 = upd.adagrad %t, %s, %d_1, %step {lr = 1.000000e-02 : f64} : !emb.table<100x8xf32>, !emb.state<100x8>, !upd.delta<8xf32, i32, unique>, i64
func.func @arg(%t: !emb.table<100x8xf32>, %s: !emb.state<100x8>, %d: !upd.delta<8xf32, i32>, %step: i64) -> !emb.table<100x8xf32> {
  %t2, %s2 = upd.adagrad %t, %s, %d, %step {lr = 0.01 : f64} : !emb.table<100x8xf32>, !emb.state<100x8>, !upd.delta<8xf32, i32>, i64
  func.return %t2 : !emb.table<100x8xf32>
}

// Already-unique deltas get no dedup.

// CHECK-LABEL: func.func @unique
// CHECK-NOT:     upd.dedup
// CHECK:         upd.rowwise_adagrad %t, %m, %d {
// CHECK-NEXT:    func.return
func.func @unique(%t: !emb.table<100x8xf32>, %m: !emb.state<100x1>, %d: !upd.delta<8xf32, i64, unique>) -> !emb.table<100x8xf32> {
  %t2, %m2 = upd.rowwise_adagrad %t, %m, %d {lr = 0.01 : f64} : !emb.table<100x8xf32>, !emb.state<100x1>, !upd.delta<8xf32, i64, unique>
  func.return %t2 : !emb.table<100x8xf32>
}

// A chain that already deduplicates gets no second dedup.

// CHECK-LABEL: func.func @already
// CHECK-NEXT:    %u = upd.dedup %d : !upd.delta<8xf32, i64>
// CHECK-NEXT:    upd.rowwise_adagrad %t, %m, %u {
// CHECK-NEXT:    func.return
func.func @already(%t: !emb.table<100x8xf32>, %m: !emb.state<100x1>, %d: !upd.delta<8xf32, i64>) -> !emb.table<100x8xf32> {
  %u = upd.dedup %d : !upd.delta<8xf32, i64>
  %t2, %m2 = upd.rowwise_adagrad %t, %m, %u {lr = 0.01 : f64} : !emb.table<100x8xf32>, !emb.state<100x1>, !upd.delta<8xf32, i64, unique>
  func.return %t2 : !emb.table<100x8xf32>
}

// Plain SGD is linear in the delta: no dedup, unless deterministic=true
// (then the float summation order is fixed).

// CHECK-LABEL: func.func @sgd
// CHECK-NEXT:    %t2 = upd.sgd %t, %d {lr = 1.000000e-01 : f64} : !emb.table<100x8xf32>, !upd.delta<8xf32, i64>
// CHECK-NEXT:    func.return
// DET-LABEL:   func.func @sgd
// DET-NEXT:      %d_1 = upd.dedup %d : !upd.delta<8xf32, i64>
// DET-NEXT:      %t2 = upd.sgd %t, %d_1 {lr = 1.000000e-01 : f64} : !emb.table<100x8xf32>, !upd.delta<8xf32, i64, unique>
// DET-NEXT:      func.return
func.func @sgd(%t: !emb.table<100x8xf32>, %d: !upd.delta<8xf32, i64>) -> !emb.table<100x8xf32> {
  %t2 = upd.sgd %t, %d {lr = 0.1 : f64} : !emb.table<100x8xf32>, !upd.delta<8xf32, i64>
  func.return %t2 : !emb.table<100x8xf32>
}

// Clipping is not linear either: SGD after a clip needs unique ids.

// CHECK-LABEL: func.func @sgd_clip_value
// CHECK-NEXT:    %d_1 = upd.dedup %d : !upd.delta<8xf32, i64>
// CHECK-NEXT:    %c = upd.clip %d_1 {clip_value = 1.000000e+00 : f64} : !upd.delta<8xf32, i64, unique>
// CHECK-NEXT:    %t2 = upd.sgd %t, %c {lr = 1.000000e-01 : f64} : !emb.table<100x8xf32>, !upd.delta<8xf32, i64, unique>
func.func @sgd_clip_value(%t: !emb.table<100x8xf32>, %d: !upd.delta<8xf32, i64>) -> !emb.table<100x8xf32> {
  %c = upd.clip %d {clip_value = 1.0 : f64} : !upd.delta<8xf32, i64>
  %t2 = upd.sgd %t, %c {lr = 0.1 : f64} : !emb.table<100x8xf32>, !upd.delta<8xf32, i64>
  func.return %t2 : !emb.table<100x8xf32>
}

// One source feeding two chains is deduplicated once, for both.

// CHECK-LABEL: func.func @shared
// CHECK-NEXT:    %d_1 = upd.dedup %d : !upd.delta<8xf32, i64>
// CHECK-NEXT:    %a, %am = upd.rowwise_adagrad %t, %m, %d_1 {
// CHECK-NEXT:    %w = upd.weight_decay %d_1, %t1 {decay = 1.000000e-03 : f64} : !upd.delta<8xf32, i64, unique>, !emb.table<100x8xf32>
// CHECK-NEXT:    %b, %bm = upd.rowwise_adagrad %t1, %m1, %w {
// CHECK-NOT:     upd.dedup
// CHECK:         func.return
func.func @shared(%t: !emb.table<100x8xf32>, %m: !emb.state<100x1>, %t1: !emb.table<100x8xf32>, %m1: !emb.state<100x1>, %d: !upd.delta<8xf32, i64>) -> (!emb.table<100x8xf32>, !emb.table<100x8xf32>) {
  %a, %am = upd.rowwise_adagrad %t, %m, %d {lr = 0.01 : f64} : !emb.table<100x8xf32>, !emb.state<100x1>, !upd.delta<8xf32, i64>
  %w = upd.weight_decay %d, %t1 {decay = 0.001 : f64} : !upd.delta<8xf32, i64>, !emb.table<100x8xf32>
  %b, %bm = upd.rowwise_adagrad %t1, %m1, %w {lr = 0.01 : f64} : !emb.table<100x8xf32>, !emb.state<100x1>, !upd.delta<8xf32, i64>
  func.return %a, %b : !emb.table<100x8xf32>, !emb.table<100x8xf32>
}
