;; resp_header("x-big", value) n times, the value being len bytes of 'a'
;; (16 headers of ~3.9 MiB, unless the body gives n and len as two u32 LE).
;; Answers each call's result (n i32 LE).
(module
  (import "tallow" "resp_header" (func $header (param i32 i32 i32 i32) (result i32)))
  (import "tallow" "req_body_len" (func $blen (result i32)))
  (import "tallow" "req_body_read" (func $bread (param i32 i32 i32) (result i32)))
  (import "tallow" "resp_write" (func $write (param i32 i32) (result i32)))
  (memory (export "memory") 64)
  (data (i32.const 0) "x-big")
  (func (export "handle") (result i32)
    (local $n i32) (local $len i32) (local $i i32)
    (local.set $n (i32.const 16))
    (local.set $len (i32.const 4128768))  ;; 4 MiB - 64 KiB: the value fills the rest of memory
    (if (i32.ge_u (call $blen) (i32.const 8)) (then
      (drop (call $bread (i32.const 0) (i32.const 16) (i32.const 8)))
      (local.set $n (i32.load (i32.const 16)))
      (local.set $len (i32.load (i32.const 20)))))
    (memory.fill (i32.const 65536) (i32.const 97) (i32.const 4128768))
    (block $done (loop $more
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (i32.store (i32.add (i32.const 1024) (i32.mul (local.get $i) (i32.const 4)))
                 (call $header (i32.const 0) (i32.const 5) (i32.const 65536) (local.get $len)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $more)))
    (drop (call $write (i32.const 1024) (i32.mul (local.get $n) (i32.const 4))))
    (i32.const 0)))
