// RUN: ekko-opt %s -p upd-dedup,upd-fuse,upd-schedule{partitions=2},lower-to-kernel -t llvm | filecheck %s

// `-t llvm` prints each kernel's spec and its LLVM IR (llvmlite.ir). Rowwise
// Adagrad is deduplicated before the optimizer, bucket by bucket (a range of
// rows each: the bucket count comes from leading zeros); its apply phase prefetches
// the rows it will touch, streams each row's old bytes into the journal
// (non-temporal stores), runs the optimizer with a square root,
// re-quantizes the int8 serving row with nearest-even rounding, and
// returns a status (a stored value that is not finite refuses the call);
// the undo function puts journaled rows back.

// CHECK:       ; ekko kernel for @train: update:{{.*}}dedup=True,dim=64,{{.*}}optimizer=rowwise_adagrad,order=input,partitions=2,prefetch=16,serving=int8,{{.*}}versions=True
// CHECK:       define i64 @"ekko_update_dedup"(
// CHECK:         call i64 @"llvm.ctlz.i64"
// CHECK:       define i64 @"ekko_update_apply"(
// CHECK:         call void @"llvm.prefetch.p0"
// CHECK:         store <4 x i32> {{.*}}, !nontemporal
// CHECK:         call float @"llvm.sqrt.f32"
// CHECK:         call float @"llvm.rint.f32"
// CHECK:         fptoui float {{.*}} to i8
// CHECK:       define void @"ekko_update_undo"(
func.func @train(%t: !emb.table<1000x64xf32>, %m: !emb.state<1000x1>, %q: !emb.table<1000x64xint8>,
                 %v: !emb.versions<1000>, %ids: tensor<?xi64>, %rows: tensor<?x64xf32>, %ver: i64)
    -> (!emb.table<1000x64xf32>, !emb.state<1000x1>, !emb.table<1000x64xint8>, !emb.versions<1000>) {
  %d = upd.delta %ids, %rows : tensor<?xi64>, tensor<?x64xf32>
  %t2, %m2 = upd.rowwise_adagrad %t, %m, %d {lr = 0.01 : f64} : !emb.table<1000x64xf32>, !emb.state<1000x1>, !upd.delta<64xf32, i64>
  %q2 = upd.requantize %t2, %q, %d : !emb.table<1000x64xf32>, !emb.table<1000x64xint8>, !upd.delta<64xf32, i64>
  %v2 = upd.stamp %v, %d, %ver : !emb.versions<1000>, !upd.delta<64xf32, i64>, i64
  func.return %t2, %m2, %q2, %v2 : !emb.table<1000x64xf32>, !emb.state<1000x1>, !emb.table<1000x64xint8>, !emb.versions<1000>
}

// Plain SGD on an f32 table needs no dedup: the apply phase reads the raw
// delta, and the dedup phase only validates it.

// CHECK:       ; ekko kernel for @sgd: update:{{.*}}dedup=False,dim=13,{{.*}}optimizer=sgd,order=input,partitions=2,
// CHECK:       define i64 @"ekko_update_dedup"(
// CHECK:       define i64 @"ekko_update_apply"(
// CHECK-NOT:   llvm.sqrt
// CHECK:       ; ekko kernel for @serve: bag:dim=13,index_dtype=i32,layout=f32,mode=mean,partitions=2
// CHECK:       define i64 @"bag_kernel"(
func.func @sgd(%t: !emb.table<50x13xf32>, %ids: tensor<?xi32>, %rows: tensor<?x13xf32>) -> !emb.table<50x13xf32> {
  %d = upd.delta %ids, %rows : tensor<?xi32>, tensor<?x13xf32>
  %t2 = upd.sgd %t, %d {lr = 0.1 : f64} : !emb.table<50x13xf32>, !upd.delta<13xf32, i32>
  func.return %t2 : !emb.table<50x13xf32>
}

func.func @serve(%t: !emb.table<50x13xf32>, %ids: tensor<?xi32>, %offsets: tensor<?xi32>) -> tensor<?x13xf32> {
  %p = emb.bag %t, %ids, %offsets {mode = "mean"} : !emb.table<50x13xf32>, tensor<?xi32>, tensor<?xi32>
  func.return %p : tensor<?x13xf32>
}
