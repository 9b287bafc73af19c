"test.op"() {s = "abcdefghijklmnopqrstuvwxyz0123456789\q"} : () -> ()
