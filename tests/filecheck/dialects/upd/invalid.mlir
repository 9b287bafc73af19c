// RUN: ekko-opt %s --split-input-file --verify-diagnostics --parsing-diagnostics | filecheck %s

// Types: !upd.delta

// CHECK: expected the delta's row size, e.g. 64xf32
"test.op"() : () -> !upd.delta<0xf32, i64>

// -----

// CHECK: expected the delta's row size, e.g. 64xf32
"test.op"() : () -> !upd.delta<4x4xf32, i64>

// -----

// CHECK: delta ids must be i32 or i64
"test.op"() : () -> !upd.delta<4xf32, i16>

// -----

// CHECK: Expected 'f32' (delta rows are f32)
"test.op"() : () -> !upd.delta<4xf16, i64>

// -----

// CHECK: Expected 'unique'
"test.op"() : () -> !upd.delta<4xf32, i64, sorted>

// -----

// upd.delta

// CHECK: Expected 2 operands, but got 1
%ids = "test.op"() : () -> tensor<?xi64>
%d = "upd.delta"(%ids) : (tensor<?xi64>) -> !upd.delta<4xf32, i64>

// -----

// CHECK: the delta's ids must be a 1-d tensor of i32 or i64, got tensor<?xf32>
%ids, %rows = "test.op"() : () -> (tensor<?xf32>, tensor<?x4xf32>)
%d = "upd.delta"(%ids, %rows) : (tensor<?xf32>, tensor<?x4xf32>) -> !upd.delta<4xf32, i64>

// -----

// CHECK: the delta's rows must be a 2-d tensor of f32
%ids, %rows = "test.op"() : () -> (tensor<?xi64>, tensor<?xf32>)
%d = "upd.delta"(%ids, %rows) : (tensor<?xi64>, tensor<?xf32>) -> !upd.delta<4xf32, i64>

// -----

// CHECK: the delta's rows need a static, positive width
%ids, %rows = "test.op"() : () -> (tensor<?xi64>, tensor<?x?xf32>)
%d = "upd.delta"(%ids, %rows) : (tensor<?xi64>, tensor<?x?xf32>) -> !upd.delta<4xf32, i64>

// -----

// CHECK: the delta's rows must be a 2-d tensor of f32, got tensor<?x4xf64>
%ids, %rows = "test.op"() : () -> (tensor<?xi64>, tensor<?x4xf64>)
%d = "upd.delta"(%ids, %rows) : (tensor<?xi64>, tensor<?x4xf64>) -> !upd.delta<4xf32, i64>

// -----

// CHECK: 'upd.delta' result types must be [!upd.delta<4xf32, i64>]
%ids, %rows = "test.op"() : () -> (tensor<?xi64>, tensor<?x4xf32>)
%d = "upd.delta"(%ids, %rows) : (tensor<?xi64>, tensor<?x4xf32>) -> !upd.delta<4xf32, i64, unique>

// -----

// The custom form infers result types: operand errors are parse errors there.

// CHECK: 'upd.delta' takes ids and rows
%ids = "test.op"() : () -> tensor<?xi64>
%d = upd.delta %ids : tensor<?xi64>

// -----

// upd.dedup

// CHECK: Expected 1 operand, but got 2
%d = "test.op"() : () -> !upd.delta<4xf32, i64>
%u = "upd.dedup"(%d, %d) : (!upd.delta<4xf32, i64>, !upd.delta<4xf32, i64>) -> !upd.delta<4xf32, i64, unique>

// -----

// CHECK: operand 'input' at position 0 does not verify:
%d = "test.op"() : () -> tensor<?xi64>
%u = "upd.dedup"(%d) : (tensor<?xi64>) -> !upd.delta<4xf32, i64, unique>

// -----

// CHECK: 'upd.dedup' result types must be [!upd.delta<4xf32, i64, unique>]
%d = "test.op"() : () -> !upd.delta<4xf32, i64>
%u = "upd.dedup"(%d) : (!upd.delta<4xf32, i64>) -> !upd.delta<4xf32, i64>

// -----

// upd.clip

// CHECK: Expected 1 operand, but got 0
%d = "test.op"() : () -> !upd.delta<4xf32, i64>
%c = "upd.clip"() {max_norm = 1.0 : f64} : () -> !upd.delta<4xf32, i64>

// -----

// CHECK: 'upd.clip' needs max_norm or clip_value
%d = "test.op"() : () -> !upd.delta<4xf32, i64>
%c = "upd.clip"(%d) : (!upd.delta<4xf32, i64>) -> !upd.delta<4xf32, i64>

// -----

// CHECK: 'upd.clip' max_norm must be positive, got 0.0
%d = "test.op"() : () -> !upd.delta<4xf32, i64>
%c = "upd.clip"(%d) {max_norm = 0.0 : f64} : (!upd.delta<4xf32, i64>) -> !upd.delta<4xf32, i64>

// -----

// CHECK: 'upd.clip' clip_value must be positive, got -1.0
%d = "test.op"() : () -> !upd.delta<4xf32, i64>
%c = "upd.clip"(%d) {clip_value = -1.0 : f64} : (!upd.delta<4xf32, i64>) -> !upd.delta<4xf32, i64>

// -----

// CHECK: 'max_norm' must be a float, got 1 : i64
%d = "test.op"() : () -> !upd.delta<4xf32, i64>
%c = "upd.clip"(%d) {max_norm = 1 : i64} : (!upd.delta<4xf32, i64>) -> !upd.delta<4xf32, i64>

// -----

// upd.weight_decay

// CHECK: Expected 2 operands, but got 1
%d = "test.op"() : () -> !upd.delta<4xf32, i64>
%w = "upd.weight_decay"(%d) {decay = 0.1 : f64} : (!upd.delta<4xf32, i64>) -> !upd.delta<4xf32, i64>

// -----

// CHECK: operand 'input' at position 0 does not verify:
%t, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>)
%w = "upd.weight_decay"(%t, %d) {decay = 0.1 : f64} : (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>) -> !upd.delta<4xf32, i64>

// -----

// CHECK: 'upd.weight_decay' cannot update a quantized table (int8): optimizers update f32/f16/bf16 master tables and re-quantize serving copies
%d, %q = "test.op"() : () -> (!upd.delta<4xf32, i64>, !emb.table<10x4xint8>)
%w = "upd.weight_decay"(%d, %q) {decay = 0.1 : f64} : (!upd.delta<4xf32, i64>, !emb.table<10x4xint8>) -> !upd.delta<4xf32, i64>

// -----

// CHECK: operand 'table' at position 1 does not verify:
%d, %x = "test.op"() : () -> (!upd.delta<4xf32, i64>, tensor<?xi64>)
%w = "upd.weight_decay"(%d, %x) {decay = 0.1 : f64} : (!upd.delta<4xf32, i64>, tensor<?xi64>) -> !upd.delta<4xf32, i64>

// -----

// CHECK: 'upd.weight_decay': delta rows have 8 values but the table's dim is 4
%d, %t = "test.op"() : () -> (!upd.delta<8xf32, i64>, !emb.table<10x4xf32>)
%w = "upd.weight_decay"(%d, %t) {decay = 0.1 : f64} : (!upd.delta<8xf32, i64>, !emb.table<10x4xf32>) -> !upd.delta<8xf32, i64>

// -----

// CHECK: 'upd.weight_decay' needs the hyper-parameter 'decay'
%d, %t = "test.op"() : () -> (!upd.delta<4xf32, i64>, !emb.table<10x4xf32>)
%w = "upd.weight_decay"(%d, %t) : (!upd.delta<4xf32, i64>, !emb.table<10x4xf32>) -> !upd.delta<4xf32, i64>

// -----

// Optimizers

// CHECK: 'upd.adam' takes 5 operands: table, exp_avg state, exp_avg_sq state, delta, step
%t, %s, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.state<10x4>, !upd.delta<4xf32, i64, unique>)
%r:3 = upd.adam %t, %s, %s, %d {lr = 0.1 : f64} : !emb.table<10x4xf32>, !emb.state<10x4>, !emb.state<10x4>, !upd.delta<4xf32, i64, unique>

// -----

// CHECK: 'upd.sgd' takes 2 operands: table, delta
%t = "test.op"() : () -> !emb.table<10x4xf32>
%r = upd.sgd %t {lr = 0.1 : f64} : !emb.table<10x4xf32>

// -----

// CHECK: 'upd.rowwise_adagrad' cannot update a quantized table (int8)
%q, %m, %d = "test.op"() : () -> (!emb.table<10x4xint8>, !emb.state<10x1>, !upd.delta<4xf32, i64, unique>)
%r:2 = upd.rowwise_adagrad %q, %m, %d {lr = 0.1 : f64} : !emb.table<10x4xint8>, !emb.state<10x1>, !upd.delta<4xf32, i64, unique>

// -----

// CHECK: 'upd.adagrad' needs its sum state table, got !emb.versions<10>
%t, %v, %d, %step = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.versions<10>, !upd.delta<4xf32, i64, unique>, i64)
%r:2 = upd.adagrad %t, %v, %d, %step {lr = 0.1 : f64} : !emb.table<10x4xf32>, !emb.versions<10>, !upd.delta<4xf32, i64, unique>, i64

// -----

// CHECK: 'upd.rowwise_adagrad' momentum state must be !emb.state<10x1>, got !emb.state<10x4>
%t, %s, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.state<10x4>, !upd.delta<4xf32, i64, unique>)
%r:2 = upd.rowwise_adagrad %t, %s, %d {lr = 0.1 : f64} : !emb.table<10x4xf32>, !emb.state<10x4>, !upd.delta<4xf32, i64, unique>

// -----

// CHECK: 'upd.adagrad' sum state must be !emb.state<10x4>, got !emb.state<20x4>
%t, %s, %d, %step = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.state<20x4>, !upd.delta<4xf32, i64, unique>, i64)
%r:2 = upd.adagrad %t, %s, %d, %step {lr = 0.1 : f64} : !emb.table<10x4xf32>, !emb.state<20x4>, !upd.delta<4xf32, i64, unique>, i64

// -----

// CHECK: 'upd.sgd' delta must be an !upd.delta, got tensor<?x4xf32>
%t, %d = "test.op"() : () -> (!emb.table<10x4xf32>, tensor<?x4xf32>)
%r = upd.sgd %t, %d {lr = 0.1 : f64} : !emb.table<10x4xf32>, tensor<?x4xf32>

// -----

// CHECK: 'upd.sgd': delta rows have 8 values but the table's dim is 4
%t, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<8xf32, i64>)
%r = upd.sgd %t, %d {lr = 0.1 : f64} : !emb.table<10x4xf32>, !upd.delta<8xf32, i64>

// -----

// CHECK: 'upd.adagrad' step must be an i64 scalar, got i32
%t, %s, %d, %step = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.state<10x4>, !upd.delta<4xf32, i64, unique>, i32)
%r:2 = upd.adagrad %t, %s, %d, %step {lr = 0.1 : f64} : !emb.table<10x4xf32>, !emb.state<10x4>, !upd.delta<4xf32, i64, unique>, i32

// -----

// CHECK: 'upd.sgd' result types must be [!emb.table<10x4xf32>]
%t, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>)
%r = "upd.sgd"(%t, %d) <{operandSegmentSizes = array<i32: 1, 0, 1, 0>}> {lr = 0.1 : f64} : (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>) -> !emb.table<10x4xf16>

// -----

// CHECK: 'upd.sgd' needs the hyper-parameter 'lr'
%t, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>)
%r = upd.sgd %t, %d : !emb.table<10x4xf32>, !upd.delta<4xf32, i64>

// -----

// CHECK: 'upd.sgd' lr must be positive, got -0.1
%t, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>)
%r = upd.sgd %t, %d {lr = -0.1 : f64} : !emb.table<10x4xf32>, !upd.delta<4xf32, i64>

// -----

// CHECK: 'upd.rowwise_adagrad' eps must be positive, got 0.0
%t, %m, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.state<10x1>, !upd.delta<4xf32, i64, unique>)
%r:2 = upd.rowwise_adagrad %t, %m, %d {lr = 0.1 : f64, eps = 0.0 : f64} : !emb.table<10x4xf32>, !emb.state<10x1>, !upd.delta<4xf32, i64, unique>

// -----

// CHECK: 'upd.sgd' has no hyper-parameter 'eps' (it takes lr)
%t, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>)
%r = upd.sgd %t, %d {lr = 0.1 : f64, eps = 1.0e-08 : f64} : !emb.table<10x4xf32>, !upd.delta<4xf32, i64>

// -----

// CHECK: 'upd.adam' beta1 must be in [0, 1), got 1.0
%t, %s, %d, %step = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.state<10x4>, !upd.delta<4xf32, i64, unique>, i64)
%r:3 = upd.adam %t, %s, %s, %d, %step {lr = 0.1 : f64, beta1 = 1.0 : f64} : !emb.table<10x4xf32>, !emb.state<10x4>, !emb.state<10x4>, !upd.delta<4xf32, i64, unique>, i64

// -----

// CHECK: 'upd.adam' beta2 must be in [0, 1), got -0.5
%t, %s, %d, %step = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.state<10x4>, !upd.delta<4xf32, i64, unique>, i64)
%r:3 = upd.adam %t, %s, %s, %d, %step {lr = 0.1 : f64, beta2 = -0.5 : f64} : !emb.table<10x4xf32>, !emb.state<10x4>, !emb.state<10x4>, !upd.delta<4xf32, i64, unique>, i64

// -----

// upd.stochastic_round

// CHECK: Expected 2 operands, but got 1
%h = "test.op"() : () -> !emb.table<10x4xf16>
%r = "upd.stochastic_round"(%h) : (!emb.table<10x4xf16>) -> !emb.table<10x4xf16>

// -----

// CHECK: operand 'table' at position 0 does not verify:
%seed = "test.op"() : () -> i64
%r = "upd.stochastic_round"(%seed, %seed) : (i64, i64) -> !emb.table<10x4xf16>

// -----

// CHECK: stochastic rounding needs an f16 or bf16 table, got f32
%t, %d, %seed = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>, i64)
%t1 = upd.sgd %t, %d {lr = 0.1 : f64} : !emb.table<10x4xf32>, !upd.delta<4xf32, i64>
%r = "upd.stochastic_round"(%t1, %seed) : (!emb.table<10x4xf32>, i64) -> !emb.table<10x4xf32>

// -----

// CHECK: operand 'seed' at position 1 does not verify:
%h, %d, %seed = "test.op"() : () -> (!emb.table<10x4xf16>, !upd.delta<4xf32, i64>, i32)
%h1 = upd.sgd %h, %d {lr = 0.1 : f64} : !emb.table<10x4xf16>, !upd.delta<4xf32, i64>
%r = "upd.stochastic_round"(%h1, %seed) : (!emb.table<10x4xf16>, i32) -> !emb.table<10x4xf16>

// -----

// CHECK: 'upd.stochastic_round' must round the table result of an optimizer op
%h, %seed = "test.op"() : () -> (!emb.table<10x4xf16>, i64)
%r = "upd.stochastic_round"(%h, %seed) : (!emb.table<10x4xf16>, i64) -> !emb.table<10x4xf16>

// -----

// upd.requantize

// CHECK: Expected 3 operands, but got 2
%t, %q = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.table<10x4xint8>)
%r = "upd.requantize"(%t, %q) : (!emb.table<10x4xf32>, !emb.table<10x4xint8>) -> !emb.table<10x4xint8>

// -----

// CHECK: 'upd.requantize' cannot update a quantized table (int8)
%q, %d = "test.op"() : () -> (!emb.table<10x4xint8>, !upd.delta<4xf32, i64>)
%r = "upd.requantize"(%q, %q, %d) : (!emb.table<10x4xint8>, !emb.table<10x4xint8>, !upd.delta<4xf32, i64>) -> !emb.table<10x4xint8>

// -----

// CHECK: operand 'serving' at position 1 does not verify:
%t, %s, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.state<10x4>, !upd.delta<4xf32, i64>)
%r = "upd.requantize"(%t, %s, %d) : (!emb.table<10x4xf32>, !emb.state<10x4>, !upd.delta<4xf32, i64>) -> !emb.state<10x4>

// -----

// CHECK: 'upd.requantize' serving copy must have the master's rows and dim
%t, %q, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.table<10x8xint8>, !upd.delta<4xf32, i64>)
%r = "upd.requantize"(%t, %q, %d) : (!emb.table<10x4xf32>, !emb.table<10x8xint8>, !upd.delta<4xf32, i64>) -> !emb.table<10x8xint8>

// -----

// CHECK: operand 'delta' at position 2 does not verify:
%t, %q, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.table<10x4xint8>, i64)
%r = "upd.requantize"(%t, %q, %d) : (!emb.table<10x4xf32>, !emb.table<10x4xint8>, i64) -> !emb.table<10x4xint8>

// -----

// upd.stamp

// CHECK: Expected 3 operands, but got 2
%v, %d = "test.op"() : () -> (!emb.versions<10>, !upd.delta<4xf32, i64>)
%r = "upd.stamp"(%v, %d) : (!emb.versions<10>, !upd.delta<4xf32, i64>) -> !emb.versions<10>

// -----

// CHECK: operand 'versions' at position 0 does not verify:
%v, %d, %n = "test.op"() : () -> (!emb.state<10x1>, !upd.delta<4xf32, i64>, i64)
%r = "upd.stamp"(%v, %d, %n) : (!emb.state<10x1>, !upd.delta<4xf32, i64>, i64) -> !emb.state<10x1>

// -----

// CHECK: operand 'delta' at position 1 does not verify:
%v, %n = "test.op"() : () -> (!emb.versions<10>, i64)
%r = "upd.stamp"(%v, %v, %n) : (!emb.versions<10>, !emb.versions<10>, i64) -> !emb.versions<10>

// -----

// CHECK: operand 'version' at position 2 does not verify:
%v, %d, %n = "test.op"() : () -> (!emb.versions<10>, !upd.delta<4xf32, i64>, index)
%r = "upd.stamp"(%v, %d, %n) : (!emb.versions<10>, !upd.delta<4xf32, i64>, index) -> !emb.versions<10>

// -----

// upd.apply

// CHECK: 'upd.apply' needs optimizer = one of sgd, adagrad, rowwise_adagrad, adam
%t, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>)
%r = upd.apply %t, %d {optimizer = "lamb", lr = 0.1 : f64} : !emb.table<10x4xf32>, !upd.delta<4xf32, i64>

// -----

// CHECK: 'upd.apply' needs optimizer = one of sgd, adagrad, rowwise_adagrad, adam
%t, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>)
%r = upd.apply %t, %d {lr = 0.1 : f64} : !emb.table<10x4xf32>, !upd.delta<4xf32, i64>

// -----

// CHECK: 'upd.apply' operands must be (table, delta, versions, version)
%t, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>)
%r = upd.apply %t, %d {optimizer = "sgd", lr = 0.1 : f64, versions} : !emb.table<10x4xf32>, !upd.delta<4xf32, i64>

// -----

// CHECK: 'upd.apply' momentum state must be !emb.state<10x1>, got !emb.state<10x4>
%t, %s, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.state<10x4>, !upd.delta<4xf32, i64, unique>)
%r:2 = upd.apply %t, %s, %d {optimizer = "rowwise_adagrad", lr = 0.1 : f64} : !emb.table<10x4xf32>, !emb.state<10x4>, !upd.delta<4xf32, i64, unique>

// -----

// CHECK: 'upd.apply' serving copy must match the master's shape
%t, %d, %q = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>, !emb.table<20x4xint8>)
%r:2 = upd.apply %t, %d, %q {optimizer = "sgd", lr = 0.1 : f64, serving} : !emb.table<10x4xf32>, !upd.delta<4xf32, i64>, !emb.table<20x4xint8>

// -----

// CHECK: 'upd.apply' versions must be !emb.versions
%t, %d, %n = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>, i64)
%r:2 = upd.apply %t, %d, %t, %n {optimizer = "sgd", lr = 0.1 : f64, versions} : !emb.table<10x4xf32>, !upd.delta<4xf32, i64>, !emb.table<10x4xf32>, i64

// -----

// CHECK: 'upd.apply' version must be an i64 scalar, got i32
%t, %d, %v, %n = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>, !emb.versions<10>, i32)
%r:2 = upd.apply %t, %d, %v, %n {optimizer = "sgd", lr = 0.1 : f64, versions} : !emb.table<10x4xf32>, !upd.delta<4xf32, i64>, !emb.versions<10>, i32

// -----

// CHECK: 'upd.apply' with adagrad needs a step
%t, %s, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.state<10x4>, !upd.delta<4xf32, i64, unique>)
%r:2 = upd.apply %t, %s, %d {optimizer = "adagrad", lr = 0.1 : f64} : !emb.table<10x4xf32>, !emb.state<10x4>, !upd.delta<4xf32, i64, unique>

// -----

// The generic form: properties and operand segment sizes, checked against the settings.

// CHECK: 'upd.apply' result types must be [!emb.table<10x4xf32>, !emb.versions<10>]
%t, %d, %v, %n = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>, !emb.versions<10>, i64)
%r = "upd.apply"(%t, %d, %v, %n) <{optimizer = "sgd", hyper = {lr = 0.1 : f64}, operandSegmentSizes = array<i32: 1, 0, 1, 0, 1, 1, 0, 0>, resultSegmentSizes = array<i32: 1, 0, 0, 0>}> : (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>, !emb.versions<10>, i64) -> !emb.table<10x4xf32>

// -----

// CHECK: 'upd.apply' operands must be (table, delta, versions, version)
%t, %d, %v = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>, !emb.versions<10>)
%r:2 = "upd.apply"(%t, %d, %v) <{optimizer = "sgd", hyper = {lr = 0.1 : f64}, operandSegmentSizes = array<i32: 1, 0, 1, 0, 1, 0, 0, 0>, resultSegmentSizes = array<i32: 1, 0, 0, 1>}> : (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>, !emb.versions<10>) -> (!emb.table<10x4xf32>, !emb.versions<10>)

// -----

// CHECK: Expected operandSegmentSizes property in upd.apply operation.
%t, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>)
%r = "upd.apply"(%t, %d) <{optimizer = "sgd", hyper = {lr = 0.1 : f64}}> : (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>) -> !emb.table<10x4xf32>

// -----

// CHECK: 'hyper' must be a dictionary, got 1.000000e-01 : f64
%t, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>)
%r = "upd.apply"(%t, %d) <{optimizer = "sgd", hyper = 0.1 : f64, operandSegmentSizes = array<i32: 1, 0, 1, 0, 0, 0, 0, 0>, resultSegmentSizes = array<i32: 1, 0, 0, 0>}> : (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>) -> !emb.table<10x4xf32>

// -----

// CHECK: 'upd.apply' lr must be a number, got "fast"
%t, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>)
%r = "upd.apply"(%t, %d) <{optimizer = "sgd", hyper = {lr = "fast"}, operandSegmentSizes = array<i32: 1, 0, 1, 0, 0, 0, 0, 0>, resultSegmentSizes = array<i32: 1, 0, 0, 0>}> : (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>) -> !emb.table<10x4xf32>

// -----

// CHECK: 'upd.apply' has no attribute 'momentum'
%t, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>)
%r = "upd.apply"(%t, %d) <{optimizer = "sgd", hyper = {lr = 0.1 : f64, momentum = 0.9 : f64}, operandSegmentSizes = array<i32: 1, 0, 1, 0, 0, 0, 0, 0>, resultSegmentSizes = array<i32: 1, 0, 0, 0>}> : (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>) -> !emb.table<10x4xf32>

// -----

// CHECK: 'upd.apply' has no attribute 'momentum'
%t, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>)
%r = upd.apply %t, %d {optimizer = "sgd", lr = 0.1 : f64, momentum = 0.9 : f64} : !emb.table<10x4xf32>, !upd.delta<4xf32, i64>

// -----

// CHECK: 'dedup' must be a unit flag, got true
%t, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>)
%r = upd.apply %t, %d {optimizer = "sgd", lr = 0.1 : f64, dedup = true} : !emb.table<10x4xf32>, !upd.delta<4xf32, i64>

// -----

// CHECK: 'upd.apply' needs the hyper-parameter 'lr'
%t, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>)
%r = upd.apply %t, %d {optimizer = "sgd"} : !emb.table<10x4xf32>, !upd.delta<4xf32, i64>

// -----

// CHECK: stochastic rounding needs an f16 or bf16 table
%t, %d, %seed = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>, i64)
%r = upd.apply %t, %d, %seed {optimizer = "sgd", lr = 0.1 : f64, stochastic_rounding, seed} : !emb.table<10x4xf32>, !upd.delta<4xf32, i64>, i64

// -----

// CHECK: 'upd.apply' is non-linear in the delta: it needs unique ids or 'dedup'
%t, %m, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.state<10x1>, !upd.delta<4xf32, i64>)
%r:2 = upd.apply %t, %m, %d {optimizer = "rowwise_adagrad", lr = 0.1 : f64} : !emb.table<10x4xf32>, !emb.state<10x1>, !upd.delta<4xf32, i64>

// -----

// CHECK: 'upd.apply' is non-linear in the delta: it needs unique ids or 'dedup'
%t, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>)
%r = upd.apply %t, %d {optimizer = "sgd", lr = 0.1 : f64, max_norm = 1.0 : f64} : !emb.table<10x4xf32>, !upd.delta<4xf32, i64>

// -----

// CHECK: 'upd.apply' is non-linear in the delta: it needs unique ids or 'dedup'
%t, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>)
%r = upd.apply %t, %d {optimizer = "sgd", lr = 0.1 : f64, clip_value = 1.0 : f64} : !emb.table<10x4xf32>, !upd.delta<4xf32, i64>

// -----

// The custom form reports the same errors while parsing.

// CHECK: 'upd.apply' operands must be (table, delta, serving)
%t, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>)
%r = upd.apply %t, %d {optimizer = "sgd", lr = 0.1 : f64, serving} : !emb.table<10x4xf32>, !upd.delta<4xf32, i64>

// -----

// upd.optimize names any catalog optimizer by its attribute.

// CHECK: 'upd.optimize' needs optimizer = "name"
%t, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64, unique>)
%r = upd.optimize %t, %d {lr = 0.1 : f64} : !emb.table<10x4xf32>, !upd.delta<4xf32, i64, unique>

// -----

// CHECK: 'upd.optimize': unknown optimizer 'lamb'
%t, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64, unique>)
%r = upd.optimize %t, %d {optimizer = "lamb", lr = 0.1 : f64} : !emb.table<10x4xf32>, !upd.delta<4xf32, i64, unique>

// -----

// CHECK: 'upd.ftrl' l1 must be zero or positive, got -1.0
%t, %z, %n, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.state<10x4>, !emb.state<10x4>, !upd.delta<4xf32, i64, unique>)
%r:3 = upd.ftrl %t, %z, %n, %d {lr = 0.1 : f64, l1 = -1.0 : f64} : !emb.table<10x4xf32>, !emb.state<10x4>, !emb.state<10x4>, !upd.delta<4xf32, i64, unique>

// -----

// CHECK: 'upd.apply' partitions must be 1 to 4096, got -5
%t, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>)
%r = upd.apply %t, %d {optimizer = "sgd", lr = 0.1 : f64, partitions = -5 : i64} : !emb.table<10x4xf32>, !upd.delta<4xf32, i64>

// -----

// CHECK: 'upd.apply' order must be one of 'input', 'bucket', 'id', got "sorted"
%t, %d = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>)
%r = upd.apply %t, %d {optimizer = "sgd", lr = 0.1 : f64, dedup, order = "sorted"} : !emb.table<10x4xf32>, !upd.delta<4xf32, i64>

// -----

// CHECK: 'versions' is a unit flag that says the versions and version operand is present, got 1 : i64
%t, %d, %v, %n = "test.op"() : () -> (!emb.table<10x4xf32>, !upd.delta<4xf32, i64>, !emb.versions<10>, i64)
%r:2 = upd.apply %t, %d, %v, %n {optimizer = "sgd", lr = 0.1 : f64, versions = 1 : i64} : !emb.table<10x4xf32>, !upd.delta<4xf32, i64>, !emb.versions<10>, i64

// -----
// The custom form checks each operand's role before the declared constraints do.

// CHECK: 'upd.dedup' takes one delta
%d = "test.op"() : () -> !upd.delta<4xf32, i64>
%u = upd.dedup %d, %d : !upd.delta<4xf32, i64>, !upd.delta<4xf32, i64>

// -----

// CHECK: 'upd.clip' takes one delta
%d = "test.op"() : () -> !upd.delta<4xf32, i64>
%c = upd.clip %d, %d {max_norm = 1.0 : f64} : !upd.delta<4xf32, i64>, !upd.delta<4xf32, i64>

// -----

// CHECK: 'upd.weight_decay' takes a delta and the table
%d = "test.op"() : () -> !upd.delta<4xf32, i64>
%w = upd.weight_decay %d {decay = 0.1 : f64} : !upd.delta<4xf32, i64>

// -----

// CHECK: 'upd.stochastic_round' takes the updated table and a seed
%h = "test.op"() : () -> !emb.table<10x4xf16>
%r = upd.stochastic_round %h : !emb.table<10x4xf16>

// -----

// CHECK: 'upd.requantize' takes the master, the serving copy, a delta
%t, %q = "test.op"() : () -> (!emb.table<10x4xf32>, !emb.table<10x4xint8>)
%r = upd.requantize %t, %q : !emb.table<10x4xf32>, !emb.table<10x4xint8>

// -----

// CHECK: 'upd.stamp' takes versions, a delta and the version
%v, %d = "test.op"() : () -> (!emb.versions<10>, !upd.delta<4xf32, i64>)
%s = upd.stamp %v, %d : !emb.versions<10>, !upd.delta<4xf32, i64>

// -----

// CHECK: 'upd.stamp' needs !emb.versions, got !emb.state<10x1>
%v, %d, %n = "test.op"() : () -> (!emb.state<10x1>, !upd.delta<4xf32, i64>, i64)
%s = upd.stamp %v, %d, %n : !emb.state<10x1>, !upd.delta<4xf32, i64>, i64
