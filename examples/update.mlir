// One table's update chain and one feature's lookup, at the model level.
// ekko-opt examples/update.mlir -p upd-dedup,upd-fuse,upd-schedule,lower-to-kernel
emb.table @items : !emb.table<1000000x64xf32> {serving = #emb.layout<int8>, optimizer = "rowwise_adagrad"}
emb.feature @item_id reads @items pooling sum

func.func @update_items(%table: !emb.table<1000000x64xf32>, %momentum: !emb.state<1000000x1>,
                        %serving: !emb.table<1000000x64xint8>, %versions: !emb.versions<1000000>,
                        %ids: tensor<?xi64>, %rows: tensor<?x64xf32>, %version: i64)
    -> (!emb.table<1000000x64xf32>, !emb.state<1000000x1>, !emb.table<1000000x64xint8>, !emb.versions<1000000>) {
  %delta = upd.delta %ids, %rows : tensor<?xi64>, tensor<?x64xf32>
  %clipped = upd.clip %delta {max_norm = 10.0 : f64} : !upd.delta<64xf32, i64>
  %t, %m = upd.rowwise_adagrad %table, %momentum, %clipped {lr = 0.01 : f64, eps = 1.0e-8 : f64}
      : !emb.table<1000000x64xf32>, !emb.state<1000000x1>, !upd.delta<64xf32, i64>
  %q = upd.requantize %t, %serving, %delta
      : !emb.table<1000000x64xf32>, !emb.table<1000000x64xint8>, !upd.delta<64xf32, i64>
  %v = upd.stamp %versions, %delta, %version : !emb.versions<1000000>, !upd.delta<64xf32, i64>, i64
  func.return %t, %m, %q, %v
      : !emb.table<1000000x64xf32>, !emb.state<1000000x1>, !emb.table<1000000x64xint8>, !emb.versions<1000000>
}

func.func @serve_item_id(%serving: !emb.table<1000000x64xint8>, %ids: tensor<?xi64>,
                         %offsets: tensor<?xi64>) -> tensor<?x64xf32> {
  %pooled = emb.bag %serving, %ids, %offsets {mode = "sum"}
      : !emb.table<1000000x64xint8>, tensor<?xi64>, tensor<?xi64>
  func.return %pooled : tensor<?x64xf32>
}
