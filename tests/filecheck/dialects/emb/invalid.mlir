// RUN: ekko-opt %s --split-input-file --verify-diagnostics --parsing-diagnostics | filecheck %s

// Types: every parameter check of !emb.table, !emb.state and !emb.versions.

// CHECK: !emb.table needs at least one row
"test.op"() : () -> !emb.table<0x4xf32>

// -----

// CHECK: !emb.table needs at least one column
"test.op"() : () -> !emb.table<4x0xf32>

// -----

// CHECK: !emb.state needs at least one row
"test.op"() : () -> !emb.state<0x1>

// -----

// CHECK: !emb.state needs at least one column
"test.op"() : () -> !emb.state<4x0>

// -----

// CHECK: unknown layout 'f64'; expected one of f32, f16, bf16, int8, int4, fp8
"test.op"() : () -> !emb.table<4x4xf64>

// -----

// CHECK: expected a layout name (f32, f16, bf16, int8, int4, fp8)
"test.op"() : () -> !emb.table<4x4x"f32">

// -----

// CHECK: expected 2 dimension(s) in !emb.table (only the rows may be dynamic: ?)
"test.op"() : () -> !emb.table<4xf32>

// -----

// CHECK: expected 2 dimension(s) in !emb.table (only the rows may be dynamic: ?)
"test.op"() : () -> !emb.table<4x?xf32>

// -----

// CHECK: expected 2 dimension(s) in !emb.state (only the rows may be dynamic: ?)
"test.op"() : () -> !emb.state<4x?>

// -----

// CHECK: expected the number of rows or ?
"test.op"() : () -> !emb.versions<0>

// -----

// emb.table

// CHECK: table @t is quantized (int8): a master table must be f32, f16 or bf16; quantize its serving copy instead
"emb.table"() {sym_name = "t", type = !emb.table<10x4xint8>} : () -> ()

// -----

// CHECK: unknown layout 'int2'; expected one of f32, f16, bf16, int8, int4, fp8
emb.table @t : !emb.table<10x4xf32> {serving = #emb.layout<int2>}

// -----

// CHECK: expected a layout name (f32, f16, bf16, int8, int4, fp8)
emb.table @t : !emb.table<10x4xf32> {serving = #emb.layout<>}

// -----

// CHECK: 'serving' must be a layout, #emb.layout<NAME>, got "int8"
emb.table @t : !emb.table<10x4xf32> {serving = "int8"}

// -----

// CHECK: expected an !emb.table type
emb.table @t : !emb.state<10x4>

// -----

// emb.feature

// CHECK: feature @f: pooling must be one of sum, mean, none
"emb.feature"() {sym_name = "f", table = @t, pooling = "max"} : () -> ()

// -----

// CHECK: pooling must be one of sum, mean, none
emb.feature @f reads @t pooling max

// -----

// emb.lookup

// CHECK: the lookup's ids must be a 1-d tensor of i32 or i64, got tensor<?xi16>
%t, %ids = "test.op"() : () -> (!emb.table<10x4xf32>, tensor<?xi16>)
%r = "emb.lookup"(%t, %ids) : (!emb.table<10x4xf32>, tensor<?xi16>) -> tensor<?x4xf32>

// -----

// CHECK: the lookup's ids must be a 1-d tensor of i32 or i64, got tensor<?x2xi64>
%t, %ids = "test.op"() : () -> (!emb.table<10x4xf32>, tensor<?x2xi64>)
%r = "emb.lookup"(%t, %ids) : (!emb.table<10x4xf32>, tensor<?x2xi64>) -> tensor<?x4xf32>

// -----

// CHECK: the lookup's result has rows of 8 values but the table's dim is 4
%t, %ids = "test.op"() : () -> (!emb.table<10x4xf32>, tensor<?xi64>)
%r = "emb.lookup"(%t, %ids) : (!emb.table<10x4xf32>, tensor<?xi64>) -> tensor<?x8xf32>

// -----

// CHECK: the lookup's result must be a 2-d tensor of f32, got tensor<?x4xf16>
%t, %ids = "test.op"() : () -> (!emb.table<10x4xf32>, tensor<?xi64>)
%r = "emb.lookup"(%t, %ids) : (!emb.table<10x4xf32>, tensor<?xi64>) -> tensor<?x4xf16>

// -----

// The custom form infers the result type, so operand errors are parse errors.

// CHECK: 'emb.lookup' takes a table and ids
%t = "test.op"() : () -> !emb.table<10x4xf32>
%r = emb.lookup %t : !emb.table<10x4xf32>

// -----

// CHECK: the lookup's first operand must be an !emb.table, got tensor<?xi64>
%x, %ids = "test.op"() : () -> (tensor<?xi64>, tensor<?xi64>)
%r = emb.lookup %x, %ids : tensor<?xi64>, tensor<?xi64>

// -----

// CHECK: 'emb.lookup' has 2 operands but 1 types
%t, %ids = "test.op"() : () -> (!emb.table<10x4xf32>, tensor<?xi64>)
%r = emb.lookup %t, %ids : !emb.table<10x4xf32>

// -----

// emb.bag

// CHECK: 'emb.bag' takes a table, ids, offsets and optional weights
%t, %ids = "test.op"() : () -> (!emb.table<10x4xf32>, tensor<?xi64>)
%r = emb.bag %t, %ids {mode = "sum"} : !emb.table<10x4xf32>, tensor<?xi64>

// -----

// CHECK: the bag's first operand must be an !emb.table, got tensor<?x4xf32>
%x, %ids = "test.op"() : () -> (tensor<?x4xf32>, tensor<?xi64>)
%r = emb.bag %x, %ids, %ids {mode = "sum"} : tensor<?x4xf32>, tensor<?xi64>, tensor<?xi64>

// -----

// CHECK: the bag's ids must be a 1-d tensor of i32 or i64, got tensor<?xf32>
%t, %ids = "test.op"() : () -> (!emb.table<10x4xf32>, tensor<?xf32>)
%r = "emb.bag"(%t, %ids, %ids) {mode = "sum"} : (!emb.table<10x4xf32>, tensor<?xf32>, tensor<?xf32>) -> tensor<?x4xf32>

// -----

// CHECK: the bag's offsets must be a 1-d tensor of i32 or i64, got tensor<?xi8>
%t, %ids, %off = "test.op"() : () -> (!emb.table<10x4xf32>, tensor<?xi64>, tensor<?xi8>)
%r = "emb.bag"(%t, %ids, %off) {mode = "sum"} : (!emb.table<10x4xf32>, tensor<?xi64>, tensor<?xi8>) -> tensor<?x4xf32>

// -----

// CHECK: the bag's offsets must have the ids' element type
%t, %ids, %off = "test.op"() : () -> (!emb.table<10x4xf32>, tensor<?xi64>, tensor<?xi32>)
%r = "emb.bag"(%t, %ids, %off) {mode = "sum"} : (!emb.table<10x4xf32>, tensor<?xi64>, tensor<?xi32>) -> tensor<?x4xf32>

// -----

// CHECK: 'emb.bag' needs mode = "sum" or "mean"
%t, %ids = "test.op"() : () -> (!emb.table<10x4xf32>, tensor<?xi64>)
%r = "emb.bag"(%t, %ids, %ids) {mode = "max"} : (!emb.table<10x4xf32>, tensor<?xi64>, tensor<?xi64>) -> tensor<?x4xf32>

// -----

// CHECK: the bag's per-sample weights must be tensor<?xf32>
%t, %ids, %w = "test.op"() : () -> (!emb.table<10x4xf32>, tensor<?xi64>, tensor<?xf16>)
%r = "emb.bag"(%t, %ids, %ids, %w) {mode = "sum"} : (!emb.table<10x4xf32>, tensor<?xi64>, tensor<?xi64>, tensor<?xf16>) -> tensor<?x4xf32>

// -----

// CHECK: per-sample weights need mode "sum"
%t, %ids, %w = "test.op"() : () -> (!emb.table<10x4xf32>, tensor<?xi64>, tensor<?xf32>)
%r = "emb.bag"(%t, %ids, %ids, %w) {mode = "mean"} : (!emb.table<10x4xf32>, tensor<?xi64>, tensor<?xi64>, tensor<?xf32>) -> tensor<?x4xf32>

// -----

// CHECK: the bag's result has rows of 8 values but the table's dim is 4
%t, %ids = "test.op"() : () -> (!emb.table<10x4xf32>, tensor<?xi64>)
%r = "emb.bag"(%t, %ids, %ids) {mode = "sum"} : (!emb.table<10x4xf32>, tensor<?xi64>, tensor<?xi64>) -> tensor<?x8xf32>

// -----

// CHECK: !emb.table has more rows than the limit (1,099,511,627,776, MAX_ROWS)
%t = "test.op"() : () -> !emb.table<99999999999999999999999x4xf32>

// -----

// CHECK: !emb.state is wider than the limit (16,384, MAX_DIM)
%s = "test.op"() : () -> !emb.state<10x100000>
