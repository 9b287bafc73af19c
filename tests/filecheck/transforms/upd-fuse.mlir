// RUN: ekko-opt %s -p upd-fuse | filecheck %s

// The whole chain (dedup, clip, weight decay, optimizer, requantize, stamp)
// becomes one upd.apply on the source delta; the optimizer's defaults (eps)
// are written out and the absorbed ops are erased.

// CHECK-LABEL: func.func @full
// CHECK-NEXT:    %d = upd.delta %ids, %rows : tensor<?xi64>, tensor<?x8xf32>
// CHECK-NEXT:    %t2, %m2, %q2, %v2 = upd.apply %t, %m, %d, %q, %v, %ver {optimizer = "rowwise_adagrad", eps = 1.000000e-08 : f64, lr = 1.000000e-02 : f64, weight_decay = 1.000000e-03 : f64, max_norm = 1.000000e+00 : f64, dedup, serving, versions} : !emb.table<100x8xf32>, !emb.state<100x1>, !upd.delta<8xf32, i64>, !emb.table<100x8xint8>, !emb.versions<100>, i64
// CHECK-NEXT:    func.return %t2, %m2, %q2, %v2
func.func @full(%t: !emb.table<100x8xf32>, %m: !emb.state<100x1>, %ids: tensor<?xi64>, %rows: tensor<?x8xf32>, %q: !emb.table<100x8xint8>, %v: !emb.versions<100>, %ver: i64) -> (!emb.table<100x8xf32>, !emb.state<100x1>, !emb.table<100x8xint8>, !emb.versions<100>) {
  %d = upd.delta %ids, %rows : tensor<?xi64>, tensor<?x8xf32>
  %u = upd.dedup %d : !upd.delta<8xf32, i64>
  %c = upd.clip %u {max_norm = 1.0 : f64} : !upd.delta<8xf32, i64, unique>
  %w = upd.weight_decay %c, %t {decay = 0.001 : f64} : !upd.delta<8xf32, i64, unique>, !emb.table<100x8xf32>
  %t2, %m2 = upd.rowwise_adagrad %t, %m, %w {lr = 0.01 : f64} : !emb.table<100x8xf32>, !emb.state<100x1>, !upd.delta<8xf32, i64, unique>
  %q2 = upd.requantize %t2, %q, %d : !emb.table<100x8xf32>, !emb.table<100x8xint8>, !upd.delta<8xf32, i64>
  %v2 = upd.stamp %v, %d, %ver : !emb.versions<100>, !upd.delta<8xf32, i64>, i64
  func.return %t2, %m2, %q2, %v2 : !emb.table<100x8xf32>, !emb.state<100x1>, !emb.table<100x8xint8>, !emb.versions<100>
}

// Stochastic rounding of the optimizer's result is absorbed with its seed;
// adam keeps its step and the user's beta1 overrides the default.

// CHECK-LABEL: func.func @rounding
// CHECK-NEXT:    %h2, %a, %b = upd.apply %h, %s, %s2, %d, %step, %seed {optimizer = "adam", beta1 = 8.000000e-01 : f64, beta2 = 9.990000e-01 : f64, eps = 1.000000e-08 : f64, lr = 1.000000e-03 : f64, stochastic_rounding, step, seed} : !emb.table<100x8xbf16>, !emb.state<100x8>, !emb.state<100x8>, !upd.delta<8xf32, i32, unique>, i64, i64
// CHECK-NEXT:    func.return %h2
func.func @rounding(%h: !emb.table<100x8xbf16>, %s: !emb.state<100x8>, %s2: !emb.state<100x8>, %d: !upd.delta<8xf32, i32, unique>, %step: i64, %seed: i64) -> !emb.table<100x8xbf16> {
  %h1, %a, %b = upd.adam %h, %s, %s2, %d, %step {lr = 0.001 : f64, beta1 = 0.8 : f64} : !emb.table<100x8xbf16>, !emb.state<100x8>, !emb.state<100x8>, !upd.delta<8xf32, i32, unique>, i64
  %h2 = upd.stochastic_round %h1, %seed : !emb.table<100x8xbf16>, i64
  func.return %h2 : !emb.table<100x8xbf16>
}

// SGD on a delta with duplicates: no dedup flag, the kernel adds them up.

// CHECK-LABEL: func.func @sgd
// CHECK-NEXT:    %t2 = upd.apply %t, %d {optimizer = "sgd", lr = 1.000000e-01 : f64} : !emb.table<100x8xf32>, !upd.delta<8xf32, i64>
// CHECK-NEXT:    func.return %t2
func.func @sgd(%t: !emb.table<100x8xf32>, %d: !upd.delta<8xf32, i64>) -> !emb.table<100x8xf32> {
  %t2 = upd.sgd %t, %d {lr = 0.1 : f64} : !emb.table<100x8xf32>, !upd.delta<8xf32, i64>
  func.return %t2 : !emb.table<100x8xf32>
}

// A chain op with a second user is absorbed (its effect is in the apply)
// but stays, since the other user still needs its result.

// CHECK-LABEL: func.func @two_users
// CHECK-NEXT:    %u = upd.dedup %d : !upd.delta<8xf32, i64>
// CHECK-NEXT:    %c = upd.clip %u {clip_value = 5.000000e-01 : f64} : !upd.delta<8xf32, i64, unique>
// CHECK-NEXT:    %t2, %m2 = upd.apply %t, %m, %d {optimizer = "rowwise_adagrad", eps = 1.000000e-08 : f64, lr = 1.000000e-02 : f64, clip_value = 5.000000e-01 : f64, dedup} : !emb.table<100x8xf32>, !emb.state<100x1>, !upd.delta<8xf32, i64>
// CHECK-NEXT:    func.return %t2, %c
func.func @two_users(%t: !emb.table<100x8xf32>, %m: !emb.state<100x1>, %d: !upd.delta<8xf32, i64>) -> (!emb.table<100x8xf32>, !upd.delta<8xf32, i64, unique>) {
  %u = upd.dedup %d : !upd.delta<8xf32, i64>
  %c = upd.clip %u {clip_value = 0.5 : f64} : !upd.delta<8xf32, i64, unique>
  %t2, %m2 = upd.rowwise_adagrad %t, %m, %c {lr = 0.01 : f64} : !emb.table<100x8xf32>, !emb.state<100x1>, !upd.delta<8xf32, i64, unique>
  func.return %t2, %c : !emb.table<100x8xf32>, !upd.delta<8xf32, i64, unique>
}

// Re-quantizing the rows of a different delta is not part of this update.

// CHECK-LABEL: func.func @other_delta
// CHECK-NEXT:    %t2 = upd.apply %t, %d {optimizer = "sgd", lr = 1.000000e-01 : f64} : !emb.table<100x8xf32>, !upd.delta<8xf32, i64>
// CHECK-NEXT:    %q2 = upd.requantize %t2, %q, %e : !emb.table<100x8xf32>, !emb.table<100x8xint4>, !upd.delta<8xf32, i64>
// CHECK-NEXT:    func.return %t2, %q2
func.func @other_delta(%t: !emb.table<100x8xf32>, %q: !emb.table<100x8xint4>, %d: !upd.delta<8xf32, i64>, %e: !upd.delta<8xf32, i64>) -> (!emb.table<100x8xf32>, !emb.table<100x8xint4>) {
  %t2 = upd.sgd %t, %d {lr = 0.1 : f64} : !emb.table<100x8xf32>, !upd.delta<8xf32, i64>
  %q2 = upd.requantize %t2, %q, %e : !emb.table<100x8xf32>, !emb.table<100x8xint4>, !upd.delta<8xf32, i64>
  func.return %t2, %q2 : !emb.table<100x8xf32>, !emb.table<100x8xint4>
}

// A stamp of the deduplicated delta carries the same ids: absorbed too.

// CHECK-LABEL: func.func @stamp_after_dedup
// CHECK-NEXT:    %t2, %s2, %v2 = upd.apply %t, %s, %d, %v, %ver, %step {optimizer = "adagrad", eps = 1.000000e-10 : f64, lr_decay = 1.000000e-02 : f64, lr = 1.000000e-01 : f64, dedup, versions, step} : !emb.table<100x8xf32>, !emb.state<100x8>, !upd.delta<8xf32, i64>, !emb.versions<100>, i64, i64
// CHECK-NEXT:    func.return %t2, %v2
func.func @stamp_after_dedup(%t: !emb.table<100x8xf32>, %s: !emb.state<100x8>, %d: !upd.delta<8xf32, i64>, %v: !emb.versions<100>, %ver: i64, %step: i64) -> (!emb.table<100x8xf32>, !emb.versions<100>) {
  %u = upd.dedup %d : !upd.delta<8xf32, i64>
  %t2, %s2 = upd.adagrad %t, %s, %u, %step {lr = 0.1 : f64, lr_decay = 0.01 : f64} : !emb.table<100x8xf32>, !emb.state<100x8>, !upd.delta<8xf32, i64, unique>, i64
  %v2 = upd.stamp %v, %u, %ver : !emb.versions<100>, !upd.delta<8xf32, i64, unique>, i64
  func.return %t2, %v2 : !emb.table<100x8xf32>, !emb.versions<100>
}
