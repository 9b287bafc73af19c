%x = arith.constant 300 : i8
