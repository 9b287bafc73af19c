func.func @train(%t: !emb.table<1000x64xf32>, %d: !upd.delta<64xf32, i64>) -> !emb.table<1000x64xf32> {
  %t2 = upd.lamb %t, %d {lr = 1.000000e-01 : f64} : !emb.table<1000x64xf32>, !upd.delta<64xf32, i64>
  func.return %t2 : !emb.table<1000x64xf32>
}
