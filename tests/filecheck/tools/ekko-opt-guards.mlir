// Inputs that make xDSL's lexer or parser hang or crash are caught first,
// with a location: an unterminated string literal (exponential backtracking),
// a bad escape, deep nesting (RecursionError), a 5,000-digit integer, an
// integer out of its type's range. Each exits 1 with one located error.

// RUN: not timeout 60 ekko-opt %S/Inputs/unterminated-string.mlir 2>&1 | filecheck %s --check-prefix=STRING
// STRING: unterminated-string.mlir:1:47: error: string literal is not closed before the end of its line
// STRING-NOT: Traceback

// RUN: not timeout 60 ekko-opt %S/Inputs/bad-escape.mlir 2>&1 | filecheck %s --check-prefix=ESCAPE
// ESCAPE: bad-escape.mlir:1:55: error: invalid escape in string literal
// ESCAPE-NOT: Traceback

// RUN: not ekko-opt %S/Inputs/deep-nesting.mlir 2>&1 | filecheck %s --check-prefix=DEEP
// DEEP: deep-nesting.mlir:1:1040: error: nesting deeper than 64 levels is not supported
// DEEP-NOT: Traceback

// RUN: not ekko-opt %S/Inputs/long-integer.mlir 2>&1 | filecheck %s --check-prefix=LONG
// LONG: long-integer.mlir:1:21: error: a number of 5000 digits (at most 4000 are supported)
// LONG-NOT: Traceback

// RUN: not ekko-opt %S/Inputs/integer-out-of-range.mlir 2>&1 | filecheck %s --check-prefix=RANGE
// RANGE: integer-out-of-range.mlir:1:21: error: Integer value 300 is out of range for type i8
// RANGE-NEXT: %x = arith.constant 300 : i8
// RANGE-NEXT: {{^}}                    ^
// RANGE-NOT: Traceback

// Malformed pipelines: one line, exit 1.
// RUN: not ekko-opt %S/Inputs/ill-typed.mlir -p upd-dedupe 2>&1 | filecheck %s --check-prefix=TYPO
// TYPO: ekko-opt: error: -p: unknown pass 'upd-dedupe'; did you mean 'upd-dedup'?
// TYPO-NOT: Traceback
// RUN: not ekko-opt %S/Inputs/ill-typed.mlir -p 'upd-schedule{partitions=' 2>&1 | filecheck %s --check-prefix=SYNTAX
// SYNTAX: ekko-opt: error: -p 'upd-schedule{partitions=' at column 25: Unknown argument value
// SYNTAX-NOT: Traceback
// RUN: not ekko-opt %S/Inputs/ill-typed.mlir -p 'upd-dedup,,' 2>&1 | filecheck %s --check-prefix=EMPTY
// EMPTY: ekko-opt: error: -p 'upd-dedup,,' at column 11: Expected pass name here
// RUN: not ekko-opt %S/Inputs/ill-typed.mlir -p 'upd-schedule{partitions=x}' 2>&1 | filecheck %s --check-prefix=VALUE
// VALUE: ekko-opt: error: -p: pass 'upd-schedule': Incompatible types
// RUN: not ekko-opt %S/Inputs/ill-typed.mlir -p 'upd-schedule{nope=1}' 2>&1 | filecheck %s --check-prefix=OPTION
// OPTION: ekko-opt: error: -p: pass 'upd-schedule': Provided arguments ["nope"] not found

// --version is ekko's; --help lists ekko's passes and says how to list xDSL's.
// RUN: ekko-opt --version | filecheck %s --check-prefix=VERSION
// VERSION: ekko-opt {{[0-9]+\.[0-9]+}}
// VERSION-SAME: (xDSL
// RUN: ekko-opt --help | filecheck %s --check-prefix=HELP
// HELP: ekko's passes: upd-dedup
// HELP-NOT: convert-arith-to-riscv
// HELP: --list-passes
// RUN: ekko-opt --list-passes | filecheck %s --check-prefix=LIST
// LIST: ekko:
// LIST-NEXT: upd-dedup
// LIST: xDSL:
// LIST: convert-arith-to-riscv
