// Bad input: a `file:line:col: error: message` diagnostic, the source line
// with a caret, a non-zero exit and never a Python traceback.

// RUN: not ekko-opt %S/Inputs/truncated.mlir 2>&1 | filecheck %s --check-prefix=TRUNC
// TRUNC: truncated.mlir:2:109: error: expected 2 dimension(s) in !emb.state (only the rows may be dynamic: ?)
// TRUNC-NEXT: %t2, %m2 = upd.rowwise_adagrad %t, %m, %d
// TRUNC-NEXT: ^^
// TRUNC-NOT: Traceback

// RUN: not ekko-opt %S/Inputs/truncated-block.mlir 2>&1 | filecheck %s --check-prefix=BLOCK
// BLOCK: truncated-block.mlir:3:1: error:
// BLOCK-SAME: in block definition
// BLOCK-NOT: Traceback

// RUN: not ekko-opt %S/Inputs/ill-typed.mlir 2>&1 | filecheck %s --check-prefix=ILL
// ILL: ill-typed.mlir:2:17: error: 'upd.sgd': delta rows have 32 values but the table's dim is 64
// ILL-NEXT: %t2 = upd.sgd %t, %d {lr = 1.000000e-01 : f64}
// ILL-NEXT: ^
// ILL-NOT: Traceback

// RUN: not ekko-opt %S/Inputs/mismatched-use.mlir 2>&1 | filecheck %s --check-prefix=USE
// USE: mismatched-use.mlir:2:23: error: operand is used with type tensor<?xi32>, but has been previously used or defined with type tensor<?xi64>
// USE-NOT: Traceback

// RUN: not ekko-opt %S/Inputs/unknown-op.mlir 2>&1 | filecheck %s --check-prefix=UNKNOWN
// UNKNOWN: unknown-op.mlir:2:18: error: Operation upd.lamb is not registered
// UNKNOWN-NOT: Traceback

// RUN: not ekko-opt %S/Inputs/undefined-value.mlir 2>&1 | filecheck %s --check-prefix=UNDEF
// UNDEF: undefined-value.mlir:{{[0-9]+}}:{{[0-9]+}}: error: values used but not defined: [%nowhere]
// UNDEF-NOT: Traceback

// Verifier errors are located at the op that failed (generic form here, so
// the custom parser's inference cannot reject it first).
// RUN: not ekko-opt %S/Inputs/verify-error.mlir 2>&1 | filecheck %s --check-prefix=VERIFY
// VERIFY: verify-error.mlir:2:3: error: 'upd.rowwise_adagrad' lr must be positive, got -1.0
// VERIFY-NEXT: %t2, %m2 = upd.rowwise_adagrad %t, %m, %d {lr = -1.0 : f64}
// VERIFY-NEXT: ^
// VERIFY-NOT: Traceback

// RUN: not ekko-opt %S/Inputs/garbage.mlir 2>&1 | filecheck %s --check-prefix=GARBAGE
// GARBAGE: garbage.mlir:1:1: error:
// GARBAGE-NOT: Traceback

// RUN: not ekko-opt %S/Inputs/not-utf8.mlir 2>&1 | filecheck %s --check-prefix=UTF8
// UTF8: not-utf8.mlir: error: input is not UTF-8 text (byte 19)
// UTF8-NOT: Traceback

// Pass errors point at the op too.
// RUN: not ekko-opt %S/../transforms/lower-to-kernel.mlir -p lower-to-kernel 2>&1 | filecheck %s --check-prefix=PASS
// PASS: lower-to-kernel.mlir:{{[0-9]+}}:3: error: 'upd.apply' updates its table in place, but 'emb.lookup' reads the old value afterwards
// PASS-NOT: Traceback

// Driver errors: a missing file, an unknown pass.
// RUN: not ekko-opt %S/Inputs/no-such-file.mlir 2>&1 | filecheck %s --check-prefix=MISSING
// MISSING: ekko-opt: error: [Errno 2] No such file or directory:
// MISSING-NOT: Traceback
// RUN: not ekko-opt %S/Inputs/ill-typed.mlir -p no-such-pass 2>&1 | filecheck %s --check-prefix=NOPASS
// NOPASS: ekko-opt: error: -p: unknown pass 'no-such-pass' (ekko's passes: upd-dedup, upd-fuse, upd-schedule, lower-to-kernel; --list-passes prints all)
// NOPASS-NOT: Traceback
