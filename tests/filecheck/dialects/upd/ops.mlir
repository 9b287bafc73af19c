// RUN: ekko-opt %s | ekko-opt | filecheck %s
// RUN: ekko-opt %s --print-op-generic | ekko-opt | filecheck %s
// RUN: ekko-opt %s --print-op-generic | filecheck %s --check-prefix=GENERIC

// CHECK: builtin.module {
// The delta type: i32 and i64 ids, with and without duplicates
func.func @types(%a: !upd.delta<64xf32, i64>, %b: !upd.delta<64xf32, i32>, %c: !upd.delta<1xf32, i64, unique>, %d: !upd.delta<8xf32, i32, unique>) {
// CHECK-NEXT: func.func @types(%a: !upd.delta<64xf32, i64>, %b: !upd.delta<64xf32, i32>, %c: !upd.delta<1xf32, i64, unique>, %d: !upd.delta<8xf32, i32, unique>) {
  func.return
// CHECK-NEXT: func.return
}
// CHECK-NEXT: }

// upd.delta, upd.dedup, upd.clip, upd.weight_decay
func.func @chain(%ids: tensor<?xi64>, %ids32: tensor<?xi32>, %rows: tensor<?x64xf32>, %t: !emb.table<1000x64xf32>, %tdyn: !emb.table<?x64xbf16>) {
// CHECK-NEXT: func.func @chain(%ids: tensor<?xi64>, %ids32: tensor<?xi32>, %rows: tensor<?x64xf32>, %t: !emb.table<1000x64xf32>, %tdyn: !emb.table<?x64xbf16>) {
  %d = upd.delta %ids, %rows : tensor<?xi64>, tensor<?x64xf32>
// CHECK-NEXT: %d = upd.delta %ids, %rows : tensor<?xi64>, tensor<?x64xf32>
  %d32 = upd.delta %ids32, %rows : tensor<?xi32>, tensor<?x64xf32>
// CHECK-NEXT: %d32 = upd.delta %ids32, %rows : tensor<?xi32>, tensor<?x64xf32>
  %u = upd.dedup %d : !upd.delta<64xf32, i64>
// CHECK-NEXT: %u = upd.dedup %d : !upd.delta<64xf32, i64>
  %u32 = upd.dedup %d32 : !upd.delta<64xf32, i32>
// CHECK-NEXT: %u32 = upd.dedup %d32 : !upd.delta<64xf32, i32>
  %uu = upd.dedup %u : !upd.delta<64xf32, i64, unique>
// CHECK-NEXT: %uu = upd.dedup %u : !upd.delta<64xf32, i64, unique>
  %n = upd.clip %u {max_norm = 1.000000e+00 : f64} : !upd.delta<64xf32, i64, unique>
// CHECK-NEXT: %n = upd.clip %u {max_norm = 1.000000e+00 : f64} : !upd.delta<64xf32, i64, unique>
  %v = upd.clip %d32 {clip_value = 5.000000e-01 : f64} : !upd.delta<64xf32, i32>
// CHECK-NEXT: %v = upd.clip %d32 {clip_value = 5.000000e-01 : f64} : !upd.delta<64xf32, i32>
  %nv = upd.clip %d {max_norm = 2.000000e+00 : f64, clip_value = 1.000000e-01 : f64} : !upd.delta<64xf32, i64>
// CHECK-NEXT: %nv = upd.clip %d {max_norm = 2.000000e+00 : f64, clip_value = 1.000000e-01 : f64} : !upd.delta<64xf32, i64>
  %w = upd.weight_decay %n, %t {decay = 1.000000e-04 : f64} : !upd.delta<64xf32, i64, unique>, !emb.table<1000x64xf32>
// CHECK-NEXT: %w = upd.weight_decay %n, %t {decay = 1.000000e-04 : f64} : !upd.delta<64xf32, i64, unique>, !emb.table<1000x64xf32>
  %wd = upd.weight_decay %u32, %tdyn {decay = 1.000000e-02 : f64} : !upd.delta<64xf32, i32, unique>, !emb.table<?x64xbf16>
// CHECK-NEXT: %wd = upd.weight_decay %u32, %tdyn {decay = 1.000000e-02 : f64} : !upd.delta<64xf32, i32, unique>, !emb.table<?x64xbf16>
  func.return
// CHECK-NEXT: func.return
}
// CHECK-NEXT: }

// Every optimizer, with and without its optional hyper-parameters
func.func @optimizers(%t: !emb.table<1000x64xf32>, %h: !emb.table<1000x64xf16>, %b: !emb.table<?x64xbf16>, %m: !emb.state<1000x1>, %s: !emb.state<1000x64>, %s2: !emb.state<1000x64>, %sb: !emb.state<?x64>, %d: !upd.delta<64xf32, i64>, %u: !upd.delta<64xf32, i32, unique>, %step: i64) {
// CHECK-NEXT: func.func @optimizers(%t: !emb.table<1000x64xf32>, %h: !emb.table<1000x64xf16>, %b: !emb.table<?x64xbf16>, %m: !emb.state<1000x1>, %s: !emb.state<1000x64>, %s2: !emb.state<1000x64>, %sb: !emb.state<?x64>, %d: !upd.delta<64xf32, i64>, %u: !upd.delta<64xf32, i32, unique>, %step: i64) {
  %t1 = upd.sgd %t, %d {lr = 1.000000e-01 : f64} : !emb.table<1000x64xf32>, !upd.delta<64xf32, i64>
// CHECK-NEXT: %t1 = upd.sgd %t, %d {lr = 1.000000e-01 : f64} : !emb.table<1000x64xf32>, !upd.delta<64xf32, i64>
  %t2 = upd.sgd %h, %u {lr = 5.000000e-02 : f64} : !emb.table<1000x64xf16>, !upd.delta<64xf32, i32, unique>
// CHECK-NEXT: %t2 = upd.sgd %h, %u {lr = 5.000000e-02 : f64} : !emb.table<1000x64xf16>, !upd.delta<64xf32, i32, unique>
  %t3, %s3 = upd.adagrad %t, %s, %u, %step {lr = 1.000000e-02 : f64} : !emb.table<1000x64xf32>, !emb.state<1000x64>, !upd.delta<64xf32, i32, unique>, i64
// CHECK-NEXT: %t3, %s3 = upd.adagrad %t, %s, %u, %step {lr = 1.000000e-02 : f64} : !emb.table<1000x64xf32>, !emb.state<1000x64>, !upd.delta<64xf32, i32, unique>, i64
  %t4, %s4 = upd.adagrad %b, %sb, %u, %step {lr = 1.000000e-02 : f64, eps = 1.000000e-10 : f64, lr_decay = 1.000000e-03 : f64} : !emb.table<?x64xbf16>, !emb.state<?x64>, !upd.delta<64xf32, i32, unique>, i64
// CHECK-NEXT: %t4, %s4 = upd.adagrad %b, %sb, %u, %step {lr = 1.000000e-02 : f64, eps = 1.000000e-10 : f64, lr_decay = 1.000000e-03 : f64} : !emb.table<?x64xbf16>, !emb.state<?x64>, !upd.delta<64xf32, i32, unique>, i64
  %t5, %m5 = upd.rowwise_adagrad %t, %m, %u {lr = 1.000000e-02 : f64} : !emb.table<1000x64xf32>, !emb.state<1000x1>, !upd.delta<64xf32, i32, unique>
// CHECK-NEXT: %t5, %m5 = upd.rowwise_adagrad %t, %m, %u {lr = 1.000000e-02 : f64} : !emb.table<1000x64xf32>, !emb.state<1000x1>, !upd.delta<64xf32, i32, unique>
  %t6, %m6 = upd.rowwise_adagrad %h, %m, %d {lr = 1.000000e-02 : f64, eps = 1.000000e-08 : f64} : !emb.table<1000x64xf16>, !emb.state<1000x1>, !upd.delta<64xf32, i64>
// CHECK-NEXT: %t6, %m6 = upd.rowwise_adagrad %h, %m, %d {lr = 1.000000e-02 : f64, eps = 1.000000e-08 : f64} : !emb.table<1000x64xf16>, !emb.state<1000x1>, !upd.delta<64xf32, i64>
  %t7, %a7, %v7 = upd.adam %t, %s, %s2, %d, %step {lr = 1.000000e-03 : f64} : !emb.table<1000x64xf32>, !emb.state<1000x64>, !emb.state<1000x64>, !upd.delta<64xf32, i64>, i64
// CHECK-NEXT: %t7, %a7, %v7 = upd.adam %t, %s, %s2, %d, %step {lr = 1.000000e-03 : f64} : !emb.table<1000x64xf32>, !emb.state<1000x64>, !emb.state<1000x64>, !upd.delta<64xf32, i64>, i64
  %t8, %a8, %v8 = upd.adam %h, %s, %s2, %u, %step {lr = 1.000000e-03 : f64, beta1 = 8.000000e-01 : f64, beta2 = 0.000000e+00 : f64, eps = 1.000000e-06 : f64} : !emb.table<1000x64xf16>, !emb.state<1000x64>, !emb.state<1000x64>, !upd.delta<64xf32, i32, unique>, i64
// CHECK-NEXT: %t8, %a8, %v8 = upd.adam %h, %s, %s2, %u, %step {lr = 1.000000e-03 : f64, beta1 = 8.000000e-01 : f64, beta2 = 0.000000e+00 : f64, eps = 1.000000e-06 : f64} : !emb.table<1000x64xf16>, !emb.state<1000x64>, !emb.state<1000x64>, !upd.delta<64xf32, i32, unique>, i64
  func.return
// CHECK-NEXT: func.return
}
// CHECK-NEXT: }

// upd.stochastic_round (f16, bf16), upd.requantize (every serving layout), upd.stamp
func.func @after(%h: !emb.table<1000x64xf16>, %b: !emb.table<?x64xbf16>, %t: !emb.table<1000x64xf32>, %d: !upd.delta<64xf32, i64>, %u: !upd.delta<64xf32, i32, unique>, %seed: i64, %q8: !emb.table<1000x64xint8>, %q4: !emb.table<1000x64xint4>, %sh: !emb.table<1000x64xf16>, %sb: !emb.table<1000x64xbf16>, %sf: !emb.table<1000x64xf32>, %vers: !emb.versions<1000>, %vdyn: !emb.versions<?>, %version: i64) {
// CHECK-NEXT: func.func @after(%h: !emb.table<1000x64xf16>, %b: !emb.table<?x64xbf16>, %t: !emb.table<1000x64xf32>, %d: !upd.delta<64xf32, i64>, %u: !upd.delta<64xf32, i32, unique>, %seed: i64, %q8: !emb.table<1000x64xint8>, %q4: !emb.table<1000x64xint4>, %sh: !emb.table<1000x64xf16>, %sb: !emb.table<1000x64xbf16>, %sf: !emb.table<1000x64xf32>, %vers: !emb.versions<1000>, %vdyn: !emb.versions<?>, %version: i64) {
  %h1 = upd.sgd %h, %d {lr = 1.000000e-01 : f64} : !emb.table<1000x64xf16>, !upd.delta<64xf32, i64>
// CHECK-NEXT: %h1 = upd.sgd %h, %d {lr = 1.000000e-01 : f64} : !emb.table<1000x64xf16>, !upd.delta<64xf32, i64>
  %h2 = upd.stochastic_round %h1, %seed : !emb.table<1000x64xf16>, i64
// CHECK-NEXT: %h2 = upd.stochastic_round %h1, %seed : !emb.table<1000x64xf16>, i64
  %b1 = upd.sgd %b, %u {lr = 1.000000e-01 : f64} : !emb.table<?x64xbf16>, !upd.delta<64xf32, i32, unique>
// CHECK-NEXT: %b1 = upd.sgd %b, %u {lr = 1.000000e-01 : f64} : !emb.table<?x64xbf16>, !upd.delta<64xf32, i32, unique>
  %b2 = upd.stochastic_round %b1, %seed : !emb.table<?x64xbf16>, i64
// CHECK-NEXT: %b2 = upd.stochastic_round %b1, %seed : !emb.table<?x64xbf16>, i64
  %r8 = upd.requantize %t, %q8, %d : !emb.table<1000x64xf32>, !emb.table<1000x64xint8>, !upd.delta<64xf32, i64>
// CHECK-NEXT: %r8 = upd.requantize %t, %q8, %d : !emb.table<1000x64xf32>, !emb.table<1000x64xint8>, !upd.delta<64xf32, i64>
  %r4 = upd.requantize %h2, %q4, %d : !emb.table<1000x64xf16>, !emb.table<1000x64xint4>, !upd.delta<64xf32, i64>
// CHECK-NEXT: %r4 = upd.requantize %h2, %q4, %d : !emb.table<1000x64xf16>, !emb.table<1000x64xint4>, !upd.delta<64xf32, i64>
  %rh = upd.requantize %t, %sh, %u : !emb.table<1000x64xf32>, !emb.table<1000x64xf16>, !upd.delta<64xf32, i32, unique>
// CHECK-NEXT: %rh = upd.requantize %t, %sh, %u : !emb.table<1000x64xf32>, !emb.table<1000x64xf16>, !upd.delta<64xf32, i32, unique>
  %rb = upd.requantize %t, %sb, %d : !emb.table<1000x64xf32>, !emb.table<1000x64xbf16>, !upd.delta<64xf32, i64>
// CHECK-NEXT: %rb = upd.requantize %t, %sb, %d : !emb.table<1000x64xf32>, !emb.table<1000x64xbf16>, !upd.delta<64xf32, i64>
  %rf = upd.requantize %t, %sf, %d : !emb.table<1000x64xf32>, !emb.table<1000x64xf32>, !upd.delta<64xf32, i64>
// CHECK-NEXT: %rf = upd.requantize %t, %sf, %d : !emb.table<1000x64xf32>, !emb.table<1000x64xf32>, !upd.delta<64xf32, i64>
  %v1 = upd.stamp %vers, %d, %version : !emb.versions<1000>, !upd.delta<64xf32, i64>, i64
// CHECK-NEXT: %v1 = upd.stamp %vers, %d, %version : !emb.versions<1000>, !upd.delta<64xf32, i64>, i64
  %v2 = upd.stamp %vdyn, %u, %version : !emb.versions<?>, !upd.delta<64xf32, i32, unique>, i64
// CHECK-NEXT: %v2 = upd.stamp %vdyn, %u, %version : !emb.versions<?>, !upd.delta<64xf32, i32, unique>, i64
  func.return
// CHECK-NEXT: func.return
}
// CHECK-NEXT: }

// upd.apply: every optimizer and every optional operand group
func.func @apply(%t: !emb.table<1000x64xf32>, %h: !emb.table<1000x64xf16>, %m: !emb.state<1000x1>, %s: !emb.state<1000x64>, %s2: !emb.state<1000x64>, %d: !upd.delta<64xf32, i64>, %u: !upd.delta<64xf32, i32, unique>, %q8: !emb.table<1000x64xint8>, %vers: !emb.versions<1000>, %version: i64, %step: i64, %seed: i64) {
// CHECK-NEXT: func.func @apply(%t: !emb.table<1000x64xf32>, %h: !emb.table<1000x64xf16>, %m: !emb.state<1000x1>, %s: !emb.state<1000x64>, %s2: !emb.state<1000x64>, %d: !upd.delta<64xf32, i64>, %u: !upd.delta<64xf32, i32, unique>, %q8: !emb.table<1000x64xint8>, %vers: !emb.versions<1000>, %version: i64, %step: i64, %seed: i64) {
  %a1 = upd.apply %t, %d {optimizer = "sgd", lr = 1.000000e-01 : f64} : !emb.table<1000x64xf32>, !upd.delta<64xf32, i64>
// CHECK-NEXT: %a1 = upd.apply %t, %d {optimizer = "sgd", lr = 1.000000e-01 : f64} : !emb.table<1000x64xf32>, !upd.delta<64xf32, i64>
  %a2, %a3 = upd.apply %t, %s, %u, %step {optimizer = "adagrad", lr = 1.000000e-02 : f64, eps = 1.000000e-10 : f64, lr_decay = 0.000000e+00 : f64, step} : !emb.table<1000x64xf32>, !emb.state<1000x64>, !upd.delta<64xf32, i32, unique>, i64
// CHECK-NEXT: %a2, %a3 = upd.apply %t, %s, %u, %step {optimizer = "adagrad", lr = 1.000000e-02 : f64, eps = 1.000000e-10 : f64, lr_decay = 0.000000e+00 : f64, step} : !emb.table<1000x64xf32>, !emb.state<1000x64>, !upd.delta<64xf32, i32, unique>, i64
  %a4, %a5 = upd.apply %t, %m, %d {optimizer = "rowwise_adagrad", lr = 1.000000e-02 : f64, dedup} : !emb.table<1000x64xf32>, !emb.state<1000x1>, !upd.delta<64xf32, i64>
// CHECK-NEXT: %a4, %a5 = upd.apply %t, %m, %d {optimizer = "rowwise_adagrad", lr = 1.000000e-02 : f64, dedup} : !emb.table<1000x64xf32>, !emb.state<1000x1>, !upd.delta<64xf32, i64>
  %a6, %a7, %a8 = upd.apply %t, %s, %s2, %d, %step {optimizer = "adam", lr = 1.000000e-03 : f64, beta1 = 9.000000e-01 : f64, beta2 = 9.990000e-01 : f64, eps = 1.000000e-08 : f64, dedup, step} : !emb.table<1000x64xf32>, !emb.state<1000x64>, !emb.state<1000x64>, !upd.delta<64xf32, i64>, i64
// CHECK-NEXT: %a6, %a7, %a8 = upd.apply %t, %s, %s2, %d, %step {optimizer = "adam", lr = 1.000000e-03 : f64, beta1 = 9.000000e-01 : f64, beta2 = 9.990000e-01 : f64, eps = 1.000000e-08 : f64, dedup, step} : !emb.table<1000x64xf32>, !emb.state<1000x64>, !emb.state<1000x64>, !upd.delta<64xf32, i64>, i64
  %b1, %b2, %b3 = upd.apply %t, %m, %d, %q8 {optimizer = "rowwise_adagrad", lr = 1.000000e-02 : f64, dedup, serving} : !emb.table<1000x64xf32>, !emb.state<1000x1>, !upd.delta<64xf32, i64>, !emb.table<1000x64xint8>
// CHECK-NEXT: %b1, %b2, %b3 = upd.apply %t, %m, %d, %q8 {optimizer = "rowwise_adagrad", lr = 1.000000e-02 : f64, dedup, serving} : !emb.table<1000x64xf32>, !emb.state<1000x1>, !upd.delta<64xf32, i64>, !emb.table<1000x64xint8>
  %c1, %c2 = upd.apply %t, %d, %vers, %version {optimizer = "sgd", lr = 1.000000e-01 : f64, versions} : !emb.table<1000x64xf32>, !upd.delta<64xf32, i64>, !emb.versions<1000>, i64
// CHECK-NEXT: %c1, %c2 = upd.apply %t, %d, %vers, %version {optimizer = "sgd", lr = 1.000000e-01 : f64, versions} : !emb.table<1000x64xf32>, !upd.delta<64xf32, i64>, !emb.versions<1000>, i64
  %e1 = upd.apply %h, %d, %seed {optimizer = "sgd", lr = 1.000000e-01 : f64, stochastic_rounding, seed} : !emb.table<1000x64xf16>, !upd.delta<64xf32, i64>, i64
// CHECK-NEXT: %e1 = upd.apply %h, %d, %seed {optimizer = "sgd", lr = 1.000000e-01 : f64, stochastic_rounding, seed} : !emb.table<1000x64xf16>, !upd.delta<64xf32, i64>, i64
  %f1, %f2, %f3, %f4 = upd.apply %h, %s, %u, %q8, %vers, %version, %step, %seed {optimizer = "adagrad", lr = 1.000000e-02 : f64, weight_decay = 1.000000e-04 : f64, max_norm = 1.000000e+00 : f64, clip_value = 5.000000e+00 : f64, stochastic_rounding, serving, versions, step, seed, order = "id", partitions = 4 : i64, tile = 16 : i64} : !emb.table<1000x64xf16>, !emb.state<1000x64>, !upd.delta<64xf32, i32, unique>, !emb.table<1000x64xint8>, !emb.versions<1000>, i64, i64, i64
// CHECK-NEXT: %f1, %f2, %f3, %f4 = upd.apply %h, %s, %u, %q8, %vers, %version, %step, %seed {optimizer = "adagrad", lr = 1.000000e-02 : f64, weight_decay = 1.000000e-04 : f64, max_norm = 1.000000e+00 : f64, clip_value = 5.000000e+00 : f64, stochastic_rounding, serving, versions, step, seed, order = "id", partitions = 4 : i64, tile = 16 : i64} : !emb.table<1000x64xf16>, !emb.state<1000x64>, !upd.delta<64xf32, i32, unique>, !emb.table<1000x64xint8>, !emb.versions<1000>, i64, i64, i64
  func.return
// CHECK-NEXT: func.return
}
// CHECK-NEXT: }
// CHECK-NEXT: }

// The generic form spells out the inferred result types.
// GENERIC: %u = "upd.dedup"(%d) : (!upd.delta<64xf32, i64>) -> !upd.delta<64xf32, i64, unique>
// GENERIC: %t7, %a7, %v7 = "upd.adam"(%t, %s, %s2, %d, %step) <{lr = 1.000000e-03 : f64, operandSegmentSizes = array<i32: 1, 2, 1, 1>}> : (!emb.table<1000x64xf32>, !emb.state<1000x64>, !emb.state<1000x64>, !upd.delta<64xf32, i64>, i64) -> (!emb.table<1000x64xf32>, !emb.state<1000x64>, !emb.state<1000x64>)
// GENERIC: %h2 = "upd.stochastic_round"(%h1, %seed) : (!emb.table<1000x64xf16>, i64) -> !emb.table<1000x64xf16>
// GENERIC: %r4 = "upd.requantize"(%h2, %q4, %d) : (!emb.table<1000x64xf16>, !emb.table<1000x64xint4>, !upd.delta<64xf32, i64>) -> !emb.table<1000x64xint4>
// GENERIC: %v2 = "upd.stamp"(%vdyn, %u, %version) : (!emb.versions<?>, !upd.delta<64xf32, i32, unique>, i64) -> !emb.versions<?>
// GENERIC: %b1, %b2, %b3 = "upd.apply"(%t, %m, %d, %q8) <{optimizer = "rowwise_adagrad", hyper = {lr = 1.000000e-02 : f64}, dedup, operandSegmentSizes = array<i32: 1, 1, 1, 1, 0, 0, 0, 0>, resultSegmentSizes = array<i32: 1, 1, 1, 0>}> : (!emb.table<1000x64xf32>, !emb.state<1000x1>, !upd.delta<64xf32, i64>, !emb.table<1000x64xint8>) -> (!emb.table<1000x64xf32>, !emb.state<1000x1>, !emb.table<1000x64xint8>)
// GENERIC: %c1, %c2 = "upd.apply"(%t, %d, %vers, %version) <{optimizer = "sgd", hyper = {lr = 1.000000e-01 : f64}, operandSegmentSizes = array<i32: 1, 0, 1, 0, 1, 1, 0, 0>, resultSegmentSizes = array<i32: 1, 0, 0, 1>}> : (!emb.table<1000x64xf32>, !upd.delta<64xf32, i64>, !emb.versions<1000>, i64) -> (!emb.table<1000x64xf32>, !emb.versions<1000>)
// GENERIC: %f1, %f2, %f3, %f4 = "upd.apply"(%h, %s, %u, %q8, %vers, %version, %step, %seed) <{optimizer = "adagrad", hyper = {lr = 1.000000e-02 : f64}, weight_decay = 1.000000e-04 : f64, max_norm = 1.000000e+00 : f64, clip_value = 5.000000e+00 : f64, stochastic_rounding, order = "id", partitions = 4 : i64, tile = 16 : i64, operandSegmentSizes = array<i32: 1, 1, 1, 1, 1, 1, 1, 1>, resultSegmentSizes = array<i32: 1, 1, 1, 1>}> : (!emb.table<1000x64xf16>, !emb.state<1000x64>, !upd.delta<64xf32, i32, unique>, !emb.table<1000x64xint8>, !emb.versions<1000>, i64, i64, i64) -> (!emb.table<1000x64xf16>, !emb.state<1000x64>, !emb.table<1000x64xint8>, !emb.versions<1000>)
