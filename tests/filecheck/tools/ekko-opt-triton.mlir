// RUN: ekko-opt %s -p 'upd-dedup,upd-fuse,upd-schedule{target=triton},lower-to-kernel' -t triton | filecheck %s

// `-t triton` prints each kernel's spec and its Triton source. upd-schedule
// with target=triton picks the GPU tile (block_rows, num_warps). Rowwise
// Adagrad's region is lowered op by op: the row_sum is a masked tl.sum over
// the row, row values broadcast over the tile with [:, None], and the int8
// serving row is re-made from the stored weights inside the sequence word.

// CHECK:       # ekko kernel for @train: update:block_rows=32,dedup=True,dim=64,{{.*}}num_warps=4,optimizer=rowwise_adagrad,{{.*}}serving=int8,
// CHECK:       import triton.language as tl
// CHECK:       BLOCK_DIM = tl.constexpr(64)
// CHECK-NEXT:  BLOCK_ROWS = tl.constexpr(32)
// CHECK:       def uniforms(step):
// CHECK:       def ekko_update_sum(grads, perm, starts, counts, multi, acc):
// CHECK:       def ekko_update_apply(uids, srcs, acc, grads, count, table, state0, serving, versions, seq, version, seed, uni, HAS_VERSIONS: tl.constexpr, HAS_SEQ: tl.constexpr):
// CHECK:         v{{[0-9]+}} = tl.load(state0 + rid, mask=rmask, other=0.0)  # momentum (rowwise state)
// CHECK:         v[[SQ:[0-9]+]] = v0 * v0  # mul
// CHECK-NEXT:    v{{[0-9]+}} = tl.sum(tl.where(mask, v[[SQ]], 0.0), axis=1)  # row_sum
// CHECK:         tl.math.sqrt_rn(
// CHECK:         v{{[0-9]+}} = v{{[0-9]+}}[:, None] * v0  # mul
// CHECK:         tl.atomic_add(seq + rid, 1, mask=rmask, sem='acq_rel')
// CHECK:         tl.store(state0 + rid, v{{[0-9]+}}, mask=rmask)  # momentum
// CHECK:         tl.store(table + at, w_new, mask=mask)
// CHECK:         q = _rint((stored - lo[:, None]) * inv[:, None])
// CHECK:         tl.store(versions + rid, version, mask=rmask)
// CHECK:         tl.atomic_add(seq + rid, 1, mask=rmask, sem='release')
func.func @train(%t: !emb.table<1000x64xf32>, %m: !emb.state<1000x1>, %q: !emb.table<1000x64xint8>,
                 %v: !emb.versions<1000>, %ids: tensor<?xi64>, %rows: tensor<?x64xf32>, %ver: i64)
    -> (!emb.table<1000x64xf32>, !emb.state<1000x1>, !emb.table<1000x64xint8>, !emb.versions<1000>) {
  %d = upd.delta %ids, %rows : tensor<?xi64>, tensor<?x64xf32>
  %t2, %m2 = upd.rowwise_adagrad %t, %m, %d {lr = 0.01 : f64} : !emb.table<1000x64xf32>, !emb.state<1000x1>, !upd.delta<64xf32, i64>
  %q2 = upd.requantize %t2, %q, %d : !emb.table<1000x64xf32>, !emb.table<1000x64xint8>, !upd.delta<64xf32, i64>
  %v2 = upd.stamp %v, %d, %ver : !emb.versions<1000>, !upd.delta<64xf32, i64>, i64
  func.return %t2, %m2, %q2, %v2 : !emb.table<1000x64xf32>, !emb.state<1000x1>, !emb.table<1000x64xint8>, !emb.versions<1000>
}

// A pooled int4 lookup: one program per bag, CHUNK ids gathered a step,
// two codes a byte unpacked with tl.join, the f16 scale and bias assembled
// from bytes.

// CHECK:       # ekko kernel for @serve: bag:dim=13,index_dtype=i32,layout=int4,mode=mean,
// CHECK:       def ekko_bag(table, ids, bounds, out, n):
// CHECK:         for c in range(start, end, CHUNK):
// CHECK:           codes = tl.reshape(tl.join(packed & 15, packed >> 4), (CHUNK, BLOCK_DIM)).to(tl.float32)
// CHECK:           total += tl.sum(tl.where(m, x, 0.0), axis=0)
// CHECK:       total = tl.math.div_rn(total,
func.func @serve(%t: !emb.table<100x13xint4>, %ids: tensor<?xi32>, %off: tensor<?xi32>) -> tensor<?x13xf32> {
  %b = emb.bag %t, %ids, %off {mode = "mean"} : !emb.table<100x13xint4>, tensor<?xi32>, tensor<?xi32>
  func.return %b : tensor<?x13xf32>
}

// RUN: not ekko-opt %s -p 'upd-schedule{target=cuda}' 2>&1 | filecheck %s --check-prefix=BADTARGET
// BADTARGET: ekko-opt: error: -p: pass 'upd-schedule': target must be llvm or triton, got 'cuda'
