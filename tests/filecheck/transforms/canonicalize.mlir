// RUN: ekko-opt %s -p canonicalize | filecheck %s

// A dedup of an already unique delta folds away; unused pure update ops die.
// CHECK-LABEL: func.func @double_dedup
// CHECK-NEXT:    %d = upd.delta %ids, %rows
// CHECK-NEXT:    %u = upd.dedup %d : !upd.delta<4xf32, i64>
// CHECK-NEXT:    %t = upd.sgd %w, %u {lr = 1.000000e-01 : f64} : !emb.table<8x4xf32>, !upd.delta<4xf32, i64, unique>
// CHECK-NEXT:    func.return %t
func.func @double_dedup(%w: !emb.table<8x4xf32>, %ids: tensor<?xi64>, %rows: tensor<?x4xf32>) -> !emb.table<8x4xf32> {
  %d = upd.delta %ids, %rows : tensor<?xi64>, tensor<?x4xf32>
  %u = upd.dedup %d : !upd.delta<4xf32, i64>
  %uu = upd.dedup %u : !upd.delta<4xf32, i64, unique>
  %unused = upd.clip %uu {clip_value = 1.0 : f64} : !upd.delta<4xf32, i64, unique>
  %t = upd.sgd %w, %uu {lr = 0.1 : f64} : !emb.table<8x4xf32>, !upd.delta<4xf32, i64, unique>
  func.return %t : !emb.table<8x4xf32>
}
