;; WASI fd_write(fd, iovs, n, &nwritten) with n iovecs that each cover the
;; whole 4 MiB memory (1,024 iovecs to fd 1: 4 GiB in one call, unless the
;; body gives n and fd as two u32 LE). Answers the errno and nwritten (i32 LE).
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "tallow" "req_body_len" (func $blen (result i32)))
  (import "tallow" "req_body_read" (func $bread (param i32 i32 i32) (result i32)))
  (import "tallow" "resp_write" (func $write (param i32 i32) (result i32)))
  (memory (export "memory") 64)
  (func (export "handle") (result i32)
    (local $n i32) (local $fd i32) (local $i i32)
    (local.set $n (i32.const 1024))
    (local.set $fd (i32.const 1))
    (if (i32.ge_u (call $blen) (i32.const 8)) (then
      (drop (call $bread (i32.const 0) (i32.const 65536) (i32.const 8)))
      (local.set $n (i32.load (i32.const 65536)))
      (local.set $fd (i32.load (i32.const 65540)))))
    (block $done (loop $fill
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (i32.store (i32.add (i32.const 16) (i32.mul (local.get $i) (i32.const 8))) (i32.const 0))
      (i32.store (i32.add (i32.const 20) (i32.mul (local.get $i) (i32.const 8))) (i32.const 4194304))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $fill)))
    (i32.store (i32.const 0) (call $fd_write (local.get $fd) (i32.const 16) (local.get $n) (i32.const 4)))
    (drop (call $write (i32.const 0) (i32.const 8)))
    (i32.const 0)))
