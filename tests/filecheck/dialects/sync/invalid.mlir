// RUN: ekko-opt %s --split-input-file --verify-diagnostics --parsing-diagnostics | filecheck %s

// CHECK: 'sync.merge' packet rows are 64xint4 but the serving copy is 64xint8
%q, %v, %p, %n = "test.op"() : () -> (!emb.table<10x64xint8>, !emb.versions<10>, !sync.packet<64xint4, i64>, i64)
%q2, %v2 = "sync.merge"(%q, %v, %p, %n) : (!emb.table<10x64xint8>, !emb.versions<10>, !sync.packet<64xint4, i64>, i64) -> (!emb.table<10x64xint8>, !emb.versions<10>)

// -----

// CHECK: 'sync.merge' packet rows are 32xint8 but the serving copy is 64xint8
%q, %v, %p, %n = "test.op"() : () -> (!emb.table<10x64xint8>, !emb.versions<10>, !sync.packet<32xint8, i64>, i64)
%q2, %v2 = "sync.merge"(%q, %v, %p, %n) : (!emb.table<10x64xint8>, !emb.versions<10>, !sync.packet<32xint8, i64>, i64) -> (!emb.table<10x64xint8>, !emb.versions<10>)

// -----

// CHECK: 'sync.merge' versions must have the serving copy's 10 rows, got !emb.versions<11>
%q, %v, %p, %n = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.versions<11>, !sync.packet<4xf32, i64>, i64)
%q2, %v2 = "sync.merge"(%q, %v, %p, %n) : (!emb.table<10x4xf32>, !emb.versions<11>, !sync.packet<4xf32, i64>, i64) -> (!emb.table<10x4xf32>, !emb.versions<11>)

// -----

// CHECK: operand 'newest' at position 3 does not verify:
%q, %v, %p, %n = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.versions<10>, !sync.packet<4xf32, i64>, i32)
%q2, %v2 = "sync.merge"(%q, %v, %p, %n) : (!emb.table<10x4xf32>, !emb.versions<10>, !sync.packet<4xf32, i64>, i32) -> (!emb.table<10x4xf32>, !emb.versions<10>)

// -----

// CHECK: operand 'packet' at position 2 does not verify:
%q, %v, %p, %n = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.versions<10>, tensor<?x4xf32>, i64)
%q2, %v2 = "sync.merge"(%q, %v, %p, %n) : (!emb.table<10x4xf32>, !emb.versions<10>, tensor<?x4xf32>, i64) -> (!emb.table<10x4xf32>, !emb.versions<10>)

// -----

// CHECK: Expected 2 results, but got 1
%q, %v, %p, %n = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.versions<10>, !sync.packet<4xf32, i64>, i64)
%q2 = "sync.merge"(%q, %v, %p, %n) : (!emb.table<10x4xf32>, !emb.versions<10>, !sync.packet<4xf32, i64>, i64) -> (!emb.table<10x4xf32>)

// -----

// CHECK: 'sync.merge' has no attribute 'force'
%q, %v, %p, %n = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.versions<10>, !sync.packet<4xf32, i64>, i64)
%q2, %v2 = "sync.merge"(%q, %v, %p, %n) {force} : (!emb.table<10x4xf32>, !emb.versions<10>, !sync.packet<4xf32, i64>, i64) -> (!emb.table<10x4xf32>, !emb.versions<10>)

// -----

// CHECK: Expected 3 operands, but got 2
%q, %v = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.versions<10>)
%p = "sync.pack"(%q, %v) : (!emb.table<10x4xf32>, !emb.versions<10>) -> !sync.packet<4xf32, i64>

// -----

// CHECK: 'sync.pack' ids must be a 1-d tensor of i32 or i64, got tensor<?xi16>
%q, %v, %ids = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.versions<10>, tensor<?xi16>)
%p = "sync.pack"(%q, %v, %ids) : (!emb.table<10x4xf32>, !emb.versions<10>, tensor<?xi16>) -> !sync.packet<4xf32, i64>

// -----

// CHECK: 'seq' must be a unit flag, got 1 : i64
%q, %v, %ids = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.versions<10>, tensor<?xi64>)
%p = "sync.pack"(%q, %v, %ids) {seq = 1 : i64} : (!emb.table<10x4xf32>, !emb.versions<10>, tensor<?xi64>) -> !sync.packet<4xf32, i64>

// -----

// CHECK: a packet's rows must be f32, f16 or bf16, or i8 bytes with layout int8, int4 or fp8
%ids, %rows, %pv = "test.op"() : () -> (tensor<?xi64>, tensor<?x12xi8>, tensor<?xi64>)
%p = "sync.packet"(%ids, %rows, %pv) : (tensor<?xi64>, tensor<?x12xi8>, tensor<?xi64>) -> !sync.packet<4xint8, i64>

// -----

// CHECK: int4 packet rows need the dim attribute
%ids, %rows, %pv = "test.op"() : () -> (tensor<?xi64>, tensor<?x8xi8>, tensor<?xi64>)
%p = "sync.packet"(%ids, %rows, %pv) {layout = #emb.layout<int4>} : (tensor<?xi64>, tensor<?x8xi8>, tensor<?xi64>) -> !sync.packet<7xint4, i64>

// -----

// CHECK: int4 rows of 8 bytes do not hold a row of dim 9
%ids, %rows, %pv = "test.op"() : () -> (tensor<?xi64>, tensor<?x8xi8>, tensor<?xi64>)
%p = "sync.packet"(%ids, %rows, %pv) {layout = #emb.layout<int4>, dim = 9 : i64} : (tensor<?xi64>, tensor<?x8xi8>, tensor<?xi64>) -> !sync.packet<9xint4, i64>

// -----

// CHECK: f32 rows cannot hold the f16 layout
%ids, %rows, %pv = "test.op"() : () -> (tensor<?xi64>, tensor<?x4xf32>, tensor<?xi64>)
%p = "sync.packet"(%ids, %rows, %pv) {layout = #emb.layout<f16>} : (tensor<?xi64>, tensor<?x4xf32>, tensor<?xi64>) -> !sync.packet<4xf16, i64>

// -----

// CHECK: the packet's versions must be tensor<?xi64>, got tensor<?xi32>
%ids, %rows, %pv = "test.op"() : () -> (tensor<?xi64>, tensor<?x4xf32>, tensor<?xi32>)
%p = "sync.packet"(%ids, %rows, %pv) : (tensor<?xi64>, tensor<?x4xf32>, tensor<?xi32>) -> !sync.packet<4xf32, i64>

// -----

// CHECK: unknown layout 'int3'; expected one of f32, f16, bf16, int8, int4, fp8
"test.op"() {t = !sync.packet<4xint3, i64>} : () -> ()

// -----

// CHECK: expected a layout name (f32, f16, bf16, int8, int4, fp8)
"test.op"() {t = !sync.packet<4x, i64>} : () -> ()

// -----

// CHECK: unknown layout 'int2'; expected one of f32, f16, bf16, int8, int4, fp8
%ids, %rows, %pv = "test.op"() : () -> (tensor<?xi64>, tensor<?x12xi8>, tensor<?xi64>)
%p = sync.packet %ids, %rows, %pv {layout = #emb.layout<int2>} : tensor<?xi64>, tensor<?x12xi8>, tensor<?xi64>

// -----

// CHECK: 'sync.packet' layout must be #emb.layout<NAME>, got "int8"
%ids, %rows, %pv = "test.op"() : () -> (tensor<?xi64>, tensor<?x12xi8>, tensor<?xi64>)
%p = sync.packet %ids, %rows, %pv {layout = "int8"} : tensor<?xi64>, tensor<?x12xi8>, tensor<?xi64>

// -----

// CHECK: unknown layout 'int2'; expected one of f32, f16, bf16, int8, int4, fp8
%q, %v, %ids, %r, %pv = "test.op"() : () -> (memref<10x12xi8>, memref<10xi64>, memref<?xi64>, memref<?x12xi8>, memref<?xi64>)
kern.pack %q, %v, %ids, %r, %pv {layout = #emb.layout<int2>, dim = 4 : i64} : memref<10x12xi8>, memref<10xi64>, memref<?xi64>, memref<?x12xi8>, memref<?xi64>

// -----

// CHECK: 'kern.merge' operands must be (serving, versions, seq, ids, rows, packet_versions, newest)
%q, %v, %ids, %rows, %pv, %n = "test.op"() : () -> (memref<10x4xf32>, memref<10xi64>, memref<?xi64>, memref<?x4xf32>, memref<?xi64>, i64)
kern.merge %q, %v, %ids, %rows, %pv, %n {layout = #emb.layout<f32>, dim = 4 : i64, seq} : memref<10x4xf32>, memref<10xi64>, memref<?xi64>, memref<?x4xf32>, memref<?xi64>, i64

// -----

// CHECK: the packet rows must be memref<?x12xi8>, got memref<?x4xf32>
%q, %v, %ids, %rows, %pv, %n = "test.op"() : () -> (memref<10x12xi8>, memref<10xi64>, memref<?xi64>, memref<?x4xf32>, memref<?xi64>, i64)
kern.merge %q, %v, %ids, %rows, %pv, %n {layout = #emb.layout<int8>, dim = 4 : i64} : memref<10x12xi8>, memref<10xi64>, memref<?xi64>, memref<?x4xf32>, memref<?xi64>, i64

// -----

// CHECK: the seq buffer must be memref<10xi32>
%q, %v, %s, %ids, %o, %ov = "test.op"() : () -> (memref<10x4xf16>, memref<10xi64>, memref<10xi64>, memref<?xi64>, memref<?x4xf16>, memref<?xi64>)
kern.pack %q, %v, %s, %ids, %o, %ov {layout = #emb.layout<f16>, dim = 4 : i64, seq} : memref<10x4xf16>, memref<10xi64>, memref<10xi64>, memref<?xi64>, memref<?x4xf16>, memref<?xi64>

// -----

// CHECK: 'kern.pack' needs layout = #emb.layout<NAME> and dim
%q, %v, %ids, %o, %ov = "test.op"() : () -> (memref<10x4xf16>, memref<10xi64>, memref<?xi64>, memref<?x4xf16>, memref<?xi64>)
kern.pack %q, %v, %ids, %o, %ov {layout = #emb.layout<f16>} : memref<10x4xf16>, memref<10xi64>, memref<?xi64>, memref<?x4xf16>, memref<?xi64>

// -----

// CHECK: a packet's rows must be a 2-d tensor with a static width
%ids, %rows, %v = "test.op"() : () -> (tensor<?xi64>, tensor<?xf32>, tensor<?xi64>)
%p = "sync.packet"(%ids, %rows, %v) : (tensor<?xi64>, tensor<?xf32>, tensor<?xi64>) -> !sync.packet<4xf32, i64>

// -----

// CHECK: 'sync.pack' partitions must be a positive integer
%q, %v, %ids = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.versions<10>, tensor<?xi64>)
%p = "sync.pack"(%q, %v, %ids) {partitions = 0 : i64} : (!emb.table<10x4xf32>, !emb.versions<10>, tensor<?xi64>) -> !sync.packet<4xf32, i64>

// -----

// kern.pack / kern.merge: buffers at the kernel level.

// CHECK: the int8 serving buffer must be 10x72xi8, got memref<10x64xi8>
%q, %v, %ids, %r, %pv = "test.op"() : () -> (memref<10x64xi8>, memref<10xi64>, memref<?xi64>, memref<?x72xi8>, memref<?xi64>)
kern.pack %q, %v, %ids, %r, %pv {layout = #emb.layout<int8>, dim = 64 : i64} : memref<10x64xi8>, memref<10xi64>, memref<?xi64>, memref<?x72xi8>, memref<?xi64>

// -----

// CHECK: the versions buffer must be memref<10xi64>
%q, %v, %ids, %r, %pv = "test.op"() : () -> (memref<10x4xf32>, memref<10xi32>, memref<?xi64>, memref<?x4xf32>, memref<?xi64>)
kern.pack %q, %v, %ids, %r, %pv {layout = #emb.layout<f32>, dim = 4 : i64} : memref<10x4xf32>, memref<10xi32>, memref<?xi64>, memref<?x4xf32>, memref<?xi64>

// -----

// CHECK: the packet versions must be memref<?xi64>
%q, %v, %ids, %r, %pv = "test.op"() : () -> (memref<10x4xf32>, memref<10xi64>, memref<?xi64>, memref<?x4xf32>, memref<?xi32>)
kern.pack %q, %v, %ids, %r, %pv {layout = #emb.layout<f32>, dim = 4 : i64} : memref<10x4xf32>, memref<10xi64>, memref<?xi64>, memref<?x4xf32>, memref<?xi32>

// -----

// CHECK: 'kern.merge' newest must be i64
%q, %v, %ids, %r, %pv, %n = "test.op"() : () -> (memref<10x4xf32>, memref<10xi64>, memref<?xi64>, memref<?x4xf32>, memref<?xi64>, i32)
kern.merge %q, %v, %ids, %r, %pv, %n {layout = #emb.layout<f32>, dim = 4 : i64} : memref<10x4xf32>, memref<10xi64>, memref<?xi64>, memref<?x4xf32>, memref<?xi64>, i32

// -----

// CHECK: Expected 3 operands, but got 2
%ids, %rows = "test.op"() : () -> (tensor<?xi64>, tensor<?x4xf32>)
%p = "sync.packet"(%ids, %rows) : (tensor<?xi64>, tensor<?x4xf32>) -> !sync.packet<4xf32, i64>

// -----

// CHECK: 'sync.packet' has no attribute 'colour'
%ids, %rows, %v = "test.op"() : () -> (tensor<?xi64>, tensor<?x4xf32>, tensor<?xi64>)
%p = "sync.packet"(%ids, %rows, %v) {colour = 1 : i64} : (tensor<?xi64>, tensor<?x4xf32>, tensor<?xi64>) -> !sync.packet<4xf32, i64>

// -----

// CHECK: Expected 4 operands, but got 3
%q, %v, %p = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.versions<10>, !sync.packet<4xf32, i64>)
%q2, %v2 = "sync.merge"(%q, %v, %p) : (!emb.table<10x4xf32>, !emb.versions<10>, !sync.packet<4xf32, i64>) -> (!emb.table<10x4xf32>, !emb.versions<10>)

// -----

// CHECK: expected the packet's row size, e.g. 64xint8
%p = "test.op"() : () -> !sync.packet<0xf32, i64>

// -----

// CHECK: packet ids must be i32 or i64
%p = "test.op"() : () -> !sync.packet<4xf32, i16>

// -----
// The custom form checks each operand's role before the declared constraints do.

// CHECK: 'sync.packet' takes ids, rows and versions
%ids, %rows = "test.op"() : () -> (tensor<?xi64>, tensor<?x4xf32>)
%p = sync.packet %ids, %rows : tensor<?xi64>, tensor<?x4xf32>

// -----

// CHECK: 'sync.pack' takes the serving copy, its versions and ids
%q, %v = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.versions<10>)
%p = sync.pack %q, %v : !emb.table<10x4xf32>, !emb.versions<10>

// -----

// CHECK: 'sync.pack' needs !emb.versions, got !emb.state<10x1>
%q, %v, %ids = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.state<10x1>, tensor<?xi64>)
%p = sync.pack %q, %v, %ids : !emb.table<10x4xf32>, !emb.state<10x1>, tensor<?xi64>

// -----

// CHECK: 'sync.merge' takes the serving copy, its versions, a packet and the newest version
%q, %v, %p = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.versions<10>, !sync.packet<4xf32, i64>)
%q2, %v2 = sync.merge %q, %v, %p : !emb.table<10x4xf32>, !emb.versions<10>, !sync.packet<4xf32, i64>

// -----

// CHECK: 'sync.merge' packet must be a !sync.packet, got tensor<?x4xf32>
%q, %v, %p, %n = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.versions<10>, tensor<?x4xf32>, i64)
%q2, %v2 = sync.merge %q, %v, %p, %n : !emb.table<10x4xf32>, !emb.versions<10>, tensor<?x4xf32>, i64
