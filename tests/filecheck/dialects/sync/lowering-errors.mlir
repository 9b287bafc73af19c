// RUN: ekko-opt %s --verify-diagnostics -p lower-to-kernel

// Merging in place is wrong when a later op reads the old serving copy.

func.func @reads_after(%q: !emb.table<10x4xf32>, %v: !emb.versions<10>, %p: !sync.packet<4xf32, i64>, %n: i64, %ids: tensor<?xi64>) -> tensor<?x4xf32> {
  %q2, %v2 = sync.merge %q, %v, %p, %n : !emb.table<10x4xf32>, !emb.versions<10>, !sync.packet<4xf32, i64>, i64
  // expected-error @+1 {{'sync.merge' updates its serving copy in place, but 'emb.lookup' reads the old value afterwards}}
  %r = emb.lookup %q, %ids : !emb.table<10x4xf32>, tensor<?xi64>
  func.return %r : tensor<?x4xf32>
}

