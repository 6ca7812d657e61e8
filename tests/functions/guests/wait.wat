;; Spins until the key "go" exists in the store "default", then answers 200.
;; A request the test holds open for as long as it likes: it ends when the
;; test sets the key (through the kv driver), not after some time.
(module
  (import "tallow" "kv_open" (func $open (param i32 i32) (result i32)))
  (import "tallow" "kv_exists" (func $exists (param i32 i32 i32) (result i32)))
  (import "tallow" "resp_write" (func $write (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "default")
  (data (i32.const 16) "go")
  (data (i32.const 32) "released")
  (func (export "handle") (result i32)
    (local $h i32)
    (local.set $h (call $open (i32.const 0) (i32.const 7)))
    (if (i32.lt_s (local.get $h) (i32.const 0)) (then (return (i32.const 1))))
    (block $done (loop $again
      (br_if $done (i32.eq (call $exists (local.get $h) (i32.const 16) (i32.const 2)) (i32.const 1)))
      (br $again)))
    (drop (call $write (i32.const 32) (i32.const 8)))
    (i32.const 0)))
