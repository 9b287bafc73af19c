// RUN: ekko-opt %s -p 'upd-schedule{partitions=2}' | filecheck %s
// RUN: ekko-opt %s -p 'upd-schedule{partitions=4 order=id tile=8 prefetch=4}' | filecheck %s --check-prefix=SORT
// RUN: ekko-opt %s -p 'upd-schedule{partitions=3 tile=32}' | filecheck %s --check-prefix=TILE
// RUN: ekko-opt %s -p upd-schedule | filecheck %s --check-prefix=DEFAULT

// Tiles: the whole row up to 512 values, blocks of 256 beyond; an explicit
// tile is capped at the dim. A deduplicated update walks its delta in input
// order unless asked otherwise (an order already there is replaced); one
// without dedup has no order. The LLVM target's prefetch distance is 16
// positions up to dim 64 and 8 for wide rows (lit runs with EKKO_TUNING=off,
// so no distance measured on this machine replaces the rule), or the option's.

// CHECK-LABEL: func.func @wide
// CHECK-NEXT:    upd.apply %t, %m, %d {optimizer = "rowwise_adagrad", lr = 1.000000e-02 : f64, dedup, order = "input", partitions = 2 : i64, tile = 64 : i64, prefetch = 16 : i64} :
// SORT-LABEL: func.func @wide
// SORT-NEXT:    upd.apply %t, %m, %d {optimizer = "rowwise_adagrad", lr = 1.000000e-02 : f64, dedup, order = "id", partitions = 4 : i64, tile = 8 : i64, prefetch = 4 : i64} :
// TILE-LABEL: func.func @wide
// TILE-NEXT:    upd.apply %t, %m, %d {optimizer = "rowwise_adagrad", lr = 1.000000e-02 : f64, dedup, order = "input", partitions = 3 : i64, tile = 32 : i64, prefetch = 16 : i64} :
// DEFAULT-LABEL: func.func @wide
// DEFAULT-NEXT:    upd.apply %t, %m, %d {optimizer = "rowwise_adagrad", lr = 1.000000e-02 : f64, dedup, order = "input", partitions = {{[1-9][0-9]*}} : i64, tile = 64 : i64, prefetch = 16 : i64} :
func.func @wide(%t: !emb.table<100x64xf32>, %m: !emb.state<100x1>, %d: !upd.delta<64xf32, i64>) -> !emb.table<100x64xf32> {
  %t2, %m2 = upd.apply %t, %m, %d {optimizer = "rowwise_adagrad", lr = 0.01 : f64, dedup} : !emb.table<100x64xf32>, !emb.state<100x1>, !upd.delta<64xf32, i64>
  func.return %t2 : !emb.table<100x64xf32>
}

// CHECK-LABEL: func.func @very_wide
// CHECK-NEXT:    upd.apply %t, %d {optimizer = "sgd", lr = 1.000000e-01 : f64, partitions = 2 : i64, tile = 256 : i64, prefetch = 8 : i64} : !emb.table<100x1000xf16>, !upd.delta<1000xf32, i32>
// TILE-LABEL: func.func @very_wide
// TILE-NEXT:    upd.apply %t, %d {optimizer = "sgd", lr = 1.000000e-01 : f64, partitions = 3 : i64, tile = 32 : i64, prefetch = 8 : i64} :
func.func @very_wide(%t: !emb.table<100x1000xf16>, %d: !upd.delta<1000xf32, i32>) -> !emb.table<100x1000xf16> {
  %t2 = upd.apply %t, %d {optimizer = "sgd", lr = 0.1 : f64} : !emb.table<100x1000xf16>, !upd.delta<1000xf32, i32>
  func.return %t2 : !emb.table<100x1000xf16>
}

// CHECK-LABEL: func.func @narrow
// CHECK-NEXT:    upd.apply %t, %d {optimizer = "sgd", lr = 1.000000e-01 : f64, dedup, order = "input", partitions = 2 : i64, tile = 4 : i64, prefetch = 16 : i64} : !emb.table<?x4xf32>, !upd.delta<4xf32, i64>
// SORT-LABEL: func.func @narrow
// SORT-NEXT:    upd.apply %t, %d {optimizer = "sgd", lr = 1.000000e-01 : f64, dedup, order = "id", partitions = 4 : i64, tile = 4 : i64, prefetch = 4 : i64} :
// TILE-LABEL: func.func @narrow
// TILE-NEXT:    upd.apply %t, %d {optimizer = "sgd", lr = 1.000000e-01 : f64, dedup, order = "input", partitions = 3 : i64, tile = 4 : i64, prefetch = 16 : i64}
func.func @narrow(%t: !emb.table<?x4xf32>, %d: !upd.delta<4xf32, i64>) -> !emb.table<?x4xf32> {
  %t2 = upd.apply %t, %d {optimizer = "sgd", lr = 0.1 : f64, dedup, order = "bucket"} : !emb.table<?x4xf32>, !upd.delta<4xf32, i64>
  func.return %t2 : !emb.table<?x4xf32>
}

// Serving lookups get the partition count only.

// CHECK-LABEL: func.func @serve
// CHECK-NEXT:    %b = emb.bag %q, %ids, %off {mode = "sum", partitions = 2 : i64} : !emb.table<100x64xint8>, tensor<?xi64>, tensor<?xi64>
// CHECK-NEXT:    %r = emb.lookup %q, %ids {partitions = 2 : i64} : !emb.table<100x64xint8>, tensor<?xi64>
// SORT-LABEL: func.func @serve
// SORT-NEXT:    emb.bag %q, %ids, %off {mode = "sum", partitions = 4 : i64}
// SORT-NEXT:    emb.lookup %q, %ids {partitions = 4 : i64}
func.func @serve(%q: !emb.table<100x64xint8>, %ids: tensor<?xi64>, %off: tensor<?xi64>) -> (tensor<?x64xf32>, tensor<?x64xf32>) {
  %b = emb.bag %q, %ids, %off {mode = "sum"} : !emb.table<100x64xint8>, tensor<?xi64>, tensor<?xi64>
  %r = emb.lookup %q, %ids : !emb.table<100x64xint8>, tensor<?xi64>
  func.return %b, %r : tensor<?x64xf32>, tensor<?x64xf32>
}
