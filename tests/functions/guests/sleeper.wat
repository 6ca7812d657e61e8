;; Body: [absolute u32][timeout_ns u64]. One WASI poll_oneoff on the
;; monotonic clock (userdata 0x1234): relative, or, when absolute is 1, at
;; the guest's clock now + timeout_ns. Answers [errno i32][nevents i32]
;; [the first event, 32 bytes][clock before u64][clock after u64].
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (import "tallow" "req_body_read" (func $bread (param i32 i32 i32) (result i32)))
  (import "tallow" "resp_write" (func $write (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "handle") (result i32)
    (local $abs i32)
    (drop (call $bread (i32.const 0) (i32.const 512) (i32.const 12)))
    (local.set $abs (i32.load (i32.const 512)))
    (drop (call $clock (i32.const 1) (i64.const 1) (i32.const 264)))
    ;; the subscription at 0: userdata, tag 0 (clock), clock id 1, timeout, precision 0, flags
    (i64.store (i32.const 0) (i64.const 0x1234))
    (i32.store8 (i32.const 8) (i32.const 0))
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.add (i64.load (i32.const 516))
      (select (i64.load (i32.const 264)) (i64.const 0) (local.get $abs))))
    (i64.store (i32.const 32) (i64.const 0))
    (i32.store16 (i32.const 40) (local.get $abs))
    (i32.store (i32.const 256) (call $poll (i32.const 0) (i32.const 128) (i32.const 1) (i32.const 260)))
    (drop (call $clock (i32.const 1) (i64.const 1) (i32.const 272)))
    (drop (call $write (i32.const 256) (i32.const 8)))
    (drop (call $write (i32.const 128) (i32.const 32)))
    (drop (call $write (i32.const 264) (i32.const 16)))
    (i32.const 0)))
