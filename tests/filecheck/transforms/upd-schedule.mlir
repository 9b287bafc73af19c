// RUN: ekko-opt %s -p 'upd-schedule{partitions=2}' | filecheck %s
// RUN: ekko-opt %s -p 'upd-schedule{partitions=4 sort=false tile=8}' | filecheck %s --check-prefix=NOSORT
// RUN: ekko-opt %s -p 'upd-schedule{partitions=3 tile=32}' | filecheck %s --check-prefix=TILE
// RUN: ekko-opt %s -p upd-schedule | filecheck %s --check-prefix=DEFAULT

// Tiles: two vector registers (16 f32 lanes) when the dim allows, one (8)
// when it is narrower, the dim itself below 8; an explicit tile is capped
// at the dim. sort=false removes a sort flag that was already there.

// CHECK-LABEL: func.func @wide
// CHECK-NEXT:    upd.apply %t, %m, %d {optimizer = "rowwise_adagrad", lr = 1.000000e-02 : f64, dedup, partitions = 2 : i64, tile = 16 : i64, sort}
// NOSORT-LABEL: func.func @wide
// NOSORT-NEXT:    upd.apply %t, %m, %d {optimizer = "rowwise_adagrad", lr = 1.000000e-02 : f64, dedup, partitions = 4 : i64, tile = 8 : i64} :
// TILE-LABEL: func.func @wide
// TILE-NEXT:    upd.apply %t, %m, %d {optimizer = "rowwise_adagrad", lr = 1.000000e-02 : f64, dedup, partitions = 3 : i64, tile = 32 : i64, sort}
// DEFAULT-LABEL: func.func @wide
// DEFAULT-NEXT:    upd.apply %t, %m, %d {optimizer = "rowwise_adagrad", lr = 1.000000e-02 : f64, dedup, partitions = {{[1-9][0-9]*}} : i64, tile = 16 : i64, sort}
func.func @wide(%t: !emb.table<100x64xf32>, %m: !emb.state<100x1>, %d: !upd.delta<64xf32, i64>) -> !emb.table<100x64xf32> {
  %t2, %m2 = upd.apply %t, %m, %d {optimizer = "rowwise_adagrad", lr = 0.01 : f64, dedup} : !emb.table<100x64xf32>, !emb.state<100x1>, !upd.delta<64xf32, i64>
  func.return %t2 : !emb.table<100x64xf32>
}

// CHECK-LABEL: func.func @mid
// CHECK-NEXT:    upd.apply %t, %d {optimizer = "sgd", lr = 1.000000e-01 : f64, partitions = 2 : i64, tile = 8 : i64, sort} : !emb.table<100x12xf16>, !upd.delta<12xf32, i32>
// NOSORT-LABEL: func.func @mid
// NOSORT-NEXT:    upd.apply %t, %d {optimizer = "sgd", lr = 1.000000e-01 : f64, partitions = 4 : i64, tile = 8 : i64} :
// TILE-LABEL: func.func @mid
// TILE-NEXT:    upd.apply %t, %d {optimizer = "sgd", lr = 1.000000e-01 : f64, partitions = 3 : i64, tile = 12 : i64, sort}
func.func @mid(%t: !emb.table<100x12xf16>, %d: !upd.delta<12xf32, i32>) -> !emb.table<100x12xf16> {
  %t2 = upd.apply %t, %d {optimizer = "sgd", lr = 0.1 : f64} : !emb.table<100x12xf16>, !upd.delta<12xf32, i32>
  func.return %t2 : !emb.table<100x12xf16>
}

// CHECK-LABEL: func.func @narrow
// CHECK-NEXT:    upd.apply %t, %d {optimizer = "sgd", lr = 1.000000e-01 : f64, sort, partitions = 2 : i64, tile = 4 : i64} : !emb.table<?x4xf32>, !upd.delta<4xf32, i64>
// NOSORT-LABEL: func.func @narrow
// NOSORT-NEXT:    upd.apply %t, %d {optimizer = "sgd", lr = 1.000000e-01 : f64, partitions = 4 : i64, tile = 4 : i64} :
// TILE-LABEL: func.func @narrow
// TILE-NEXT:    upd.apply %t, %d {optimizer = "sgd", lr = 1.000000e-01 : f64, sort, partitions = 3 : i64, tile = 4 : i64}
func.func @narrow(%t: !emb.table<?x4xf32>, %d: !upd.delta<4xf32, i64>) -> !emb.table<?x4xf32> {
  %t2 = upd.apply %t, %d {optimizer = "sgd", lr = 0.1 : f64, sort} : !emb.table<?x4xf32>, !upd.delta<4xf32, i64>
  func.return %t2 : !emb.table<?x4xf32>
}

// Serving lookups get the partition count only.

// CHECK-LABEL: func.func @serve
// CHECK-NEXT:    %b = emb.bag %q, %ids, %off {mode = "sum", partitions = 2 : i64} : !emb.table<100x64xint8>, tensor<?xi64>, tensor<?xi64>
// CHECK-NEXT:    %r = emb.lookup %q, %ids {partitions = 2 : i64} : !emb.table<100x64xint8>, tensor<?xi64>
// NOSORT-LABEL: func.func @serve
// NOSORT-NEXT:    emb.bag %q, %ids, %off {mode = "sum", partitions = 4 : i64}
// NOSORT-NEXT:    emb.lookup %q, %ids {partitions = 4 : i64}
func.func @serve(%q: !emb.table<100x64xint8>, %ids: tensor<?xi64>, %off: tensor<?xi64>) -> (tensor<?x64xf32>, tensor<?x64xf32>) {
  %b = emb.bag %q, %ids, %off {mode = "sum"} : !emb.table<100x64xint8>, tensor<?xi64>, tensor<?xi64>
  %r = emb.lookup %q, %ids : !emb.table<100x64xint8>, tensor<?xi64>
  func.return %b, %r : tensor<?x64xf32>, tensor<?x64xf32>
}
