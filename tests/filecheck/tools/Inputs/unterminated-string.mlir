emb.table @t : !emb.table<4x4xf32> {serving = "abcdefghijklmnopqrstuvwxyz0123456789
