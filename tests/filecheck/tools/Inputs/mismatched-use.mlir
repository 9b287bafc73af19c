func.func @serve(%t: !emb.table<1000x64xint8>, %ids: tensor<?xi64>) -> tensor<?x64xf32> {
  %r = emb.lookup %t, %ids : !emb.table<1000x64xint8>, tensor<?xi32>
  func.return %r : tensor<?x64xf32>
}
