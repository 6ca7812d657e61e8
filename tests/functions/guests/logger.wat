;; Body: [count u32][level u32][message]. Logs the message count times with
;; log(level, ...) -- or, for level 4, writes it to stdout with WASI fd_write.
;; Answers each call's result (count i32 LE).
(module
  (import "tallow" "log" (func $log (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "tallow" "req_body_len" (func $blen (result i32)))
  (import "tallow" "req_body_read" (func $bread (param i32 i32 i32) (result i32)))
  (import "tallow" "resp_write" (func $write (param i32 i32) (result i32)))
  (memory (export "memory") 32)
  (global $IN i32 (i32.const 1024))
  (global $OUT i32 (i32.const 1572864))
  (func (export "handle") (result i32)
    (local $len i32) (local $off i32) (local $n i32) (local $count i32) (local $level i32) (local $i i32)
    (local.set $len (call $blen))
    (block $read (loop $more
      (local.set $n (call $bread (local.get $off) (i32.add (global.get $IN) (local.get $off)) (i32.const 65536)))
      (br_if $read (i32.eqz (local.get $n)))
      (local.set $off (i32.add (local.get $off) (local.get $n)))
      (br $more)))
    (local.set $count (i32.load (global.get $IN)))
    (local.set $level (i32.load (i32.add (global.get $IN) (i32.const 4))))
    ;; the iovec for fd_write: the message
    (i32.store (i32.const 0) (i32.add (global.get $IN) (i32.const 8)))
    (i32.store (i32.const 4) (i32.sub (local.get $len) (i32.const 8)))
    (block $done (loop $call
      (br_if $done (i32.ge_u (local.get $i) (local.get $count)))
      (i32.store (i32.add (global.get $OUT) (i32.mul (local.get $i) (i32.const 4)))
        (if (result i32) (i32.eq (local.get $level) (i32.const 4))
          (then (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
          (else (call $log (local.get $level) (i32.add (global.get $IN) (i32.const 8))
                           (i32.sub (local.get $len) (i32.const 8))))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $call)))
    (drop (call $write (global.get $OUT) (i32.mul (local.get $count) (i32.const 4))))
    (i32.const 0)))
