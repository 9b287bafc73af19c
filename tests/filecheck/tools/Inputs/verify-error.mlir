func.func @train(%t: !emb.table<1000x64xf32>, %m: !emb.state<1000x1>, %d: !upd.delta<64xf32, i64>) -> !emb.table<1000x64xf32> {
  %t2, %m2 = upd.rowwise_adagrad %t, %m, %d {lr = -1.0 : f64} : !emb.table<1000x64xf32>, !emb.state<1000x1>, !upd.delta<64xf32, i64>
  func.return %t2 : !emb.table<1000x64xf32>
}
