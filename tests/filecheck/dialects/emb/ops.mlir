// RUN: ekko-opt %s | ekko-opt | filecheck %s
// RUN: ekko-opt %s --print-op-generic | ekko-opt | filecheck %s
// RUN: ekko-opt %s --print-op-generic | filecheck %s --check-prefix=GENERIC

// CHECK: builtin.module {
// Every emb type: tables in every layout, static and dynamic rows
func.func @types(%f32: !emb.table<1000x64xf32>, %f16: !emb.table<1000x64xf16>, %bf16: !emb.table<1000x64xbf16>, %int8: !emb.table<1000x64xint8>, %int4: !emb.table<1000x63xint4>, %dyn: !emb.table<?x8xf32>, %dyn4: !emb.table<?x8xint4>) {
// CHECK-NEXT: func.func @types(%f32: !emb.table<1000x64xf32>, %f16: !emb.table<1000x64xf16>, %bf16: !emb.table<1000x64xbf16>, %int8: !emb.table<1000x64xint8>, %int4: !emb.table<1000x63xint4>, %dyn: !emb.table<?x8xf32>, %dyn4: !emb.table<?x8xint4>) {
  func.return
// CHECK-NEXT: func.return
}
// CHECK-NEXT: }
func.func @state_versions(%rowwise: !emb.state<1000x1>, %full: !emb.state<1000x64>, %dyn: !emb.state<?x1>, %v: !emb.versions<1000>, %vdyn: !emb.versions<?>) {
// CHECK-NEXT: func.func @state_versions(%rowwise: !emb.state<1000x1>, %full: !emb.state<1000x64>, %dyn: !emb.state<?x1>, %v: !emb.versions<1000>, %vdyn: !emb.versions<?>) {
  func.return
// CHECK-NEXT: func.return
}
// CHECK-NEXT: }

// emb.table: master tables (f32, f16, bf16), optional serving layout
emb.table @users : !emb.table<1000000x64xf32>
// CHECK-NEXT: emb.table @users : !emb.table<1000000x64xf32>
emb.table @items : !emb.table<50000x32xf16> {serving = #emb.layout<int8>}
// CHECK-NEXT: emb.table @items : !emb.table<50000x32xf16> {serving = #emb.layout<int8>}
emb.table @ads : !emb.table<?x16xbf16> {serving = #emb.layout<int4>}
// CHECK-NEXT: emb.table @ads : !emb.table<?x16xbf16> {serving = #emb.layout<int4>}
emb.table @pages : !emb.table<10x8xf32> {serving = #emb.layout<f16>}
// CHECK-NEXT: emb.table @pages : !emb.table<10x8xf32> {serving = #emb.layout<f16>}
emb.table @tags : !emb.table<10x8xf32> {serving = #emb.layout<bf16>}
// CHECK-NEXT: emb.table @tags : !emb.table<10x8xf32> {serving = #emb.layout<bf16>}
emb.table @cats : !emb.table<10x8xf32> {serving = #emb.layout<f32>}
// CHECK-NEXT: emb.table @cats : !emb.table<10x8xf32> {serving = #emb.layout<f32>}

// emb.feature: every pooling mode
emb.feature @user_id reads @users pooling sum
// CHECK-NEXT: emb.feature @user_id reads @users pooling sum
emb.feature @history reads @items pooling mean
// CHECK-NEXT: emb.feature @history reads @items pooling mean
emb.feature @ad_id reads @ads pooling none
// CHECK-NEXT: emb.feature @ad_id reads @ads pooling none

// emb.lookup: i32 and i64 ids, every layout, dynamic rows
func.func @lookup(%f32: !emb.table<1000x64xf32>, %f16: !emb.table<1000x64xf16>, %bf16: !emb.table<1000x64xbf16>, %int8: !emb.table<1000x64xint8>, %int4: !emb.table<1000x63xint4>, %dyn: !emb.table<?x8xf32>, %i32: tensor<?xi32>, %i64: tensor<?xi64>) -> (tensor<?x64xf32>, tensor<?x63xf32>) {
// CHECK-NEXT: func.func @lookup(%f32: !emb.table<1000x64xf32>, %f16: !emb.table<1000x64xf16>, %bf16: !emb.table<1000x64xbf16>, %int8: !emb.table<1000x64xint8>, %int4: !emb.table<1000x63xint4>, %dyn: !emb.table<?x8xf32>, %i32: tensor<?xi32>, %i64: tensor<?xi64>) -> (tensor<?x64xf32>, tensor<?x63xf32>) {
  %a = emb.lookup %f32, %i64 : !emb.table<1000x64xf32>, tensor<?xi64>
// CHECK-NEXT: %a = emb.lookup %f32, %i64 : !emb.table<1000x64xf32>, tensor<?xi64>
  %b = emb.lookup %f16, %i32 : !emb.table<1000x64xf16>, tensor<?xi32>
// CHECK-NEXT: %b = emb.lookup %f16, %i32 : !emb.table<1000x64xf16>, tensor<?xi32>
  %c = emb.lookup %bf16, %i64 : !emb.table<1000x64xbf16>, tensor<?xi64>
// CHECK-NEXT: %c = emb.lookup %bf16, %i64 : !emb.table<1000x64xbf16>, tensor<?xi64>
  %d = emb.lookup %int8, %i32 : !emb.table<1000x64xint8>, tensor<?xi32>
// CHECK-NEXT: %d = emb.lookup %int8, %i32 : !emb.table<1000x64xint8>, tensor<?xi32>
  %e = emb.lookup %int4, %i64 : !emb.table<1000x63xint4>, tensor<?xi64>
// CHECK-NEXT: %e = emb.lookup %int4, %i64 : !emb.table<1000x63xint4>, tensor<?xi64>
  %f = emb.lookup %dyn, %i32 : !emb.table<?x8xf32>, tensor<?xi32>
// CHECK-NEXT: %f = emb.lookup %dyn, %i32 : !emb.table<?x8xf32>, tensor<?xi32>
  %g = emb.lookup %int8, %i64 {partitions = 4 : i64} : !emb.table<1000x64xint8>, tensor<?xi64>
// CHECK-NEXT: %g = emb.lookup %int8, %i64 {partitions = 4 : i64} : !emb.table<1000x64xint8>, tensor<?xi64>
  func.return %a, %e : tensor<?x64xf32>, tensor<?x63xf32>
// CHECK-NEXT: func.return %a, %e : tensor<?x64xf32>, tensor<?x63xf32>
}
// CHECK-NEXT: }

// emb.bag: sum and mean, with and without per-sample weights, i32 and i64
func.func @bag(%int8: !emb.table<1000x64xint8>, %int4: !emb.table<?x63xint4>, %f16: !emb.table<1000x64xf16>, %ids32: tensor<?xi32>, %off32: tensor<?xi32>, %ids64: tensor<?xi64>, %off64: tensor<?xi64>, %w: tensor<?xf32>) -> tensor<?x64xf32> {
// CHECK-NEXT: func.func @bag(%int8: !emb.table<1000x64xint8>, %int4: !emb.table<?x63xint4>, %f16: !emb.table<1000x64xf16>, %ids32: tensor<?xi32>, %off32: tensor<?xi32>, %ids64: tensor<?xi64>, %off64: tensor<?xi64>, %w: tensor<?xf32>) -> tensor<?x64xf32> {
  %sum = emb.bag %int8, %ids64, %off64 {mode = "sum"} : !emb.table<1000x64xint8>, tensor<?xi64>, tensor<?xi64>
// CHECK-NEXT: %sum = emb.bag %int8, %ids64, %off64 {mode = "sum"} : !emb.table<1000x64xint8>, tensor<?xi64>, tensor<?xi64>
  %mean = emb.bag %int4, %ids32, %off32 {mode = "mean"} : !emb.table<?x63xint4>, tensor<?xi32>, tensor<?xi32>
// CHECK-NEXT: %mean = emb.bag %int4, %ids32, %off32 {mode = "mean"} : !emb.table<?x63xint4>, tensor<?xi32>, tensor<?xi32>
  %weighted = emb.bag %f16, %ids32, %off32, %w {mode = "sum"} : !emb.table<1000x64xf16>, tensor<?xi32>, tensor<?xi32>, tensor<?xf32>
// CHECK-NEXT: %weighted = emb.bag %f16, %ids32, %off32, %w {mode = "sum"} : !emb.table<1000x64xf16>, tensor<?xi32>, tensor<?xi32>, tensor<?xf32>
  %sched = emb.bag %int8, %ids64, %off64, %w {mode = "sum", partitions = 2 : i64} : !emb.table<1000x64xint8>, tensor<?xi64>, tensor<?xi64>, tensor<?xf32>
// CHECK-NEXT: %sched = emb.bag %int8, %ids64, %off64, %w {mode = "sum", partitions = 2 : i64} : !emb.table<1000x64xint8>, tensor<?xi64>, tensor<?xi64>, tensor<?xf32>
  func.return %sum : tensor<?x64xf32>
// CHECK-NEXT: func.return %sum : tensor<?x64xf32>
}
// CHECK-NEXT: }
// CHECK-NEXT: }

// The generic form spells out the inferred result types.
// GENERIC: %e = "emb.lookup"(%int4, %i64) : (!emb.table<1000x63xint4>, tensor<?xi64>) -> tensor<?x63xf32>
// GENERIC: %mean = "emb.bag"(%int4, %ids32, %off32) <{mode = "mean"}> : (!emb.table<?x63xint4>, tensor<?xi32>, tensor<?xi32>) -> tensor<?x63xf32>
// GENERIC: %weighted = "emb.bag"(%f16, %ids32, %off32, %w) <{mode = "sum"}> : (!emb.table<1000x64xf16>, tensor<?xi32>, tensor<?xi32>, tensor<?xf32>) -> tensor<?x64xf32>
