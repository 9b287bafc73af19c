// RUN: ekko-opt %s | ekko-opt | filecheck %s
// RUN: ekko-opt %s --print-op-generic | ekko-opt | filecheck %s
// RUN: ekko-opt %s --print-op-generic | filecheck %s --check-prefix=GENERIC

// The packet type: every serving layout, i32 and i64 ids.
// CHECK: func.func @types(%a: !sync.packet<64xint8, i64>, %b: !sync.packet<7xint4, i32>, %c: !sync.packet<1xf32, i64>, %d: !sync.packet<16xbf16, i32>, %e: !sync.packet<3xf16, i64>)
func.func @types(%a: !sync.packet<64xint8, i64>, %b: !sync.packet<7xint4, i32>, %c: !sync.packet<1xf32, i64>, %d: !sync.packet<16xbf16, i32>, %e: !sync.packet<3xf16, i64>) {
  func.return
}

// sync.pack reads the rows a step touched from a serving copy and its versions.
// CHECK-LABEL: func.func @pack
// CHECK-NEXT: %p = sync.pack %q, %v, %ids : !emb.table<1000x64xint8>, !emb.versions<1000>, tensor<?xi64>
// CHECK-NEXT: %r = sync.pack %h, %w, %ids32 {seq} : !emb.table<?x16xf16>, !emb.versions<?>, tensor<?xi32>
// CHECK-NEXT: func.return %p, %r : !sync.packet<64xint8, i64>, !sync.packet<16xf16, i32>
// GENERIC: %p = "sync.pack"(%q, %v, %ids) : (!emb.table<1000x64xint8>, !emb.versions<1000>, tensor<?xi64>) -> !sync.packet<64xint8, i64>
func.func @pack(%q: !emb.table<1000x64xint8>, %v: !emb.versions<1000>, %ids: tensor<?xi64>, %h: !emb.table<?x16xf16>, %w: !emb.versions<?>, %ids32: tensor<?xi32>) -> (!sync.packet<64xint8, i64>, !sync.packet<16xf16, i32>) {
  %p = sync.pack %q, %v, %ids : !emb.table<1000x64xint8>, !emb.versions<1000>, tensor<?xi64>
  %r = sync.pack %h, %w, %ids32 {seq} : !emb.table<?x16xf16>, !emb.versions<?>, tensor<?xi32>
  func.return %p, %r : !sync.packet<64xint8, i64>, !sync.packet<16xf16, i32>
}

// sync.packet builds a packet from tensors: float rows name their layout by
// their type, int8 rows are dim + 8 bytes, int4 rows need the dim (7 -> 4 + 4 bytes).
// CHECK-LABEL: func.func @merge
// CHECK-NEXT: %p = sync.packet %ids, %rows, %pv {layout = #emb.layout<int4>, dim = 7 : i64} : tensor<?xi32>, tensor<?x8xi8>, tensor<?xi64>
// CHECK-NEXT: %f = sync.packet %ids, %frows, %pv : tensor<?xi32>, tensor<?x7xbf16>, tensor<?xi64>
// CHECK-NEXT: %q2, %v2 = sync.merge %q, %v, %p, %newest {seq} : !emb.table<1000x7xint4>, !emb.versions<1000>, !sync.packet<7xint4, i32>, i64
// GENERIC: %q2, %v2 = "sync.merge"(%q, %v, %p, %newest) <{seq}> : (!emb.table<1000x7xint4>, !emb.versions<1000>, !sync.packet<7xint4, i32>, i64) -> (!emb.table<1000x7xint4>, !emb.versions<1000>)
func.func @merge(%q: !emb.table<1000x7xint4>, %v: !emb.versions<1000>, %ids: tensor<?xi32>, %rows: tensor<?x8xi8>, %frows: tensor<?x7xbf16>, %pv: tensor<?xi64>, %newest: i64) -> (!emb.table<1000x7xint4>, !emb.versions<1000>) {
  %p = sync.packet %ids, %rows, %pv {layout = #emb.layout<int4>, dim = 7 : i64} : tensor<?xi32>, tensor<?x8xi8>, tensor<?xi64>
  %f = sync.packet %ids, %frows, %pv : tensor<?xi32>, tensor<?x7xbf16>, tensor<?xi64>
  %q2, %v2 = sync.merge %q, %v, %p, %newest {seq} : !emb.table<1000x7xint4>, !emb.versions<1000>, !sync.packet<7xint4, i32>, i64
  func.return %q2, %v2 : !emb.table<1000x7xint4>, !emb.versions<1000>
}

// The kernel level: kern.pack and kern.merge over buffers.
// CHECK-LABEL: func.func @kernels
// CHECK-NEXT: kern.pack %q, %v, %seq, %ids, %out, %outv {layout = #emb.layout<int8>, dim = 64 : i64, seq, partitions = 2 : i64} : memref<100x72xi8>, memref<100xi64>, memref<100xi32>, memref<?xi64>, memref<?x72xi8>, memref<?xi64>
// CHECK-NEXT: kern.merge %q, %v, %ids, %out, %outv, %n {layout = #emb.layout<int8>, dim = 64 : i64} : memref<100x72xi8>, memref<100xi64>, memref<?xi64>, memref<?x72xi8>, memref<?xi64>, i64
func.func @kernels(%q: memref<100x72xi8>, %v: memref<100xi64>, %seq: memref<100xi32>, %ids: memref<?xi64>, %out: memref<?x72xi8>, %outv: memref<?xi64>, %n: i64) {
  kern.pack %q, %v, %seq, %ids, %out, %outv {layout = #emb.layout<int8>, dim = 64 : i64, seq, partitions = 2 : i64} : memref<100x72xi8>, memref<100xi64>, memref<100xi32>, memref<?xi64>, memref<?x72xi8>, memref<?xi64>
  kern.merge %q, %v, %ids, %out, %outv, %n {layout = #emb.layout<int8>, dim = 64 : i64} : memref<100x72xi8>, memref<100xi64>, memref<?xi64>, memref<?x72xi8>, memref<?xi64>, i64
  func.return
}
