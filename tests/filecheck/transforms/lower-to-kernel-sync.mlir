// RUN: ekko-opt %s -p lower-to-kernel | filecheck %s
// RUN: ekko-opt %s -p lower-to-kernel -t llvm | filecheck %s --check-prefix=LLVM

// sync.pack becomes kern.pack: the packet's rows and versions become output
// buffers (named after the packet), its ids are the input ids. With `seq`
// the serving copy's sequence words become a new argument. int8 rows of dim
// 64: 64 codes + f32 scale and bias = 72 bytes.

// CHECK-LABEL: func.func @pack(%q: memref<1000x72xi8>, %v: memref<1000xi64>, %ids: memref<?xi64>, %q_seq: memref<1000xi32>, %p_rows_out: memref<?x72xi8>, %p_versions_out: memref<?xi64>) {
// CHECK-NEXT:    kern.pack %q, %v, %q_seq, %ids, %p_rows_out, %p_versions_out {layout = #emb.layout<int8>, dim = 64 : i64, seq, partitions = 2 : i64} : memref<1000x72xi8>, memref<1000xi64>, memref<1000xi32>, memref<?xi64>, memref<?x72xi8>, memref<?xi64>
// CHECK-NEXT:    func.return
func.func @pack(%q: !emb.table<1000x64xint8>, %v: !emb.versions<1000>, %ids: tensor<?xi64>) -> !sync.packet<64xint8, i64> {
  %p = sync.pack %q, %v, %ids {seq, partitions = 2 : i64} : !emb.table<1000x64xint8>, !emb.versions<1000>, tensor<?xi64>
  func.return %p : !sync.packet<64xint8, i64>
}

// sync.merge writes the serving copy and versions in place. A packet built
// from tensors is its three buffers; a packet argument becomes three
// arguments (%p_ids, %p_rows, %p_versions). int4 of dim 7: 4 bytes of
// nibbles + f16 scale and bias.

// CHECK-LABEL: func.func @merge(%q: memref<1000x8xi8>, %v: memref<1000xi64>, %ids: memref<?xi32>, %rows: memref<?x8xi8>, %pv: memref<?xi64>, %newest: i64, %q_seq: memref<1000xi32>) {
// CHECK-NEXT:    kern.merge %q, %v, %q_seq, %ids, %rows, %pv, %newest {layout = #emb.layout<int4>, dim = 7 : i64, seq} : memref<1000x8xi8>, memref<1000xi64>, memref<1000xi32>, memref<?xi32>, memref<?x8xi8>, memref<?xi64>, i64
// CHECK-NEXT:    func.return
func.func @merge(%q: !emb.table<1000x7xint4>, %v: !emb.versions<1000>, %ids: tensor<?xi32>, %rows: tensor<?x8xi8>, %pv: tensor<?xi64>, %newest: i64) -> (!emb.table<1000x7xint4>, !emb.versions<1000>) {
  %p = sync.packet %ids, %rows, %pv {layout = #emb.layout<int4>, dim = 7 : i64} : tensor<?xi32>, tensor<?x8xi8>, tensor<?xi64>
  %q2, %v2 = sync.merge %q, %v, %p, %newest {seq} : !emb.table<1000x7xint4>, !emb.versions<1000>, !sync.packet<7xint4, i32>, i64
  func.return %q2, %v2 : !emb.table<1000x7xint4>, !emb.versions<1000>
}

// CHECK-LABEL: func.func @merge_arg(%q: memref<?x16xbf16>, %v: memref<?xi64>, %p_ids: memref<?xi64>, %p_rows: memref<?x16xbf16>, %p_versions: memref<?xi64>, %n: i64) {
// CHECK-NEXT:    kern.merge %q, %v, %p_ids, %p_rows, %p_versions, %n {layout = #emb.layout<bf16>, dim = 16 : i64} : memref<?x16xbf16>, memref<?xi64>, memref<?xi64>, memref<?x16xbf16>, memref<?xi64>, i64
func.func @merge_arg(%q: !emb.table<?x16xbf16>, %v: !emb.versions<?>, %p: !sync.packet<16xbf16, i64>, %n: i64) -> (!emb.table<?x16xbf16>, !emb.versions<?>) {
  %q2, %v2 = sync.merge %q, %v, %p, %n : !emb.table<?x16xbf16>, !emb.versions<?>, !sync.packet<16xbf16, i64>, i64
  func.return %q2, %v2 : !emb.table<?x16xbf16>, !emb.versions<?>
}

// LLVM:       ; ekko kernel for @pack: pack:dim=64,index_dtype=i64,layout=int8,partitions=2,seq=True
// LLVM:       define i64 @"ekko_pack"(
// LLVM:         load atomic i32, i32* {{.*}} acquire
// LLVM:         call void @"llvm.memcpy.p0.p0.i64"({{.*}}, i64 72, i1 0)
// LLVM:         fence acquire
// LLVM:       ; ekko kernel for @merge: merge:dim=7,index_dtype=i32,layout=int4,partitions=1,seq=True
// LLVM:       define i64 @"ekko_merge_check"(
// LLVM:         and i16 {{.*}}, 31744
// LLVM:       define i64 @"ekko_merge_apply"(
// LLVM:         store atomic i32 {{.*}} monotonic
// LLVM-NEXT:    fence release
// LLVM:         call void @"llvm.memcpy.p0.p0.i64"({{.*}}, i64 8, i1 0)
// LLVM:         fence release
// LLVM-NEXT:    add i32 {{.*}}, 2
// LLVM-NEXT:    store atomic i32 {{.*}} monotonic
// LLVM:       ; ekko kernel for @merge_arg: merge:dim=16,index_dtype=i64,layout=bf16,partitions=1,seq=False
// LLVM-NOT:     fence
// LLVM:         and i16 {{.*}}, 32640
