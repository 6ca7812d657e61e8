;; embed_text over the first n bytes of memory (NULs: valid UTF-8), n a u32
;; LE from the body; answers the result (i32 LE).
(module
  (import "tallow" "embed_text" (func $embed (param i32 i32 i32 i32) (result i32)))
  (import "tallow" "req_body_read" (func $bread (param i32 i32 i32) (result i32)))
  (import "tallow" "resp_write" (func $write (param i32 i32) (result i32)))
  (memory (export "memory") 32)
  (func (export "handle") (result i32)
    (drop (call $bread (i32.const 0) (i32.const 0) (i32.const 4)))
    (i32.store (i32.const 0) (call $embed (i32.const 16) (i32.load (i32.const 0)) (i32.const 0) (i32.const 0)))
    (drop (call $write (i32.const 0) (i32.const 4)))
    (i32.const 0)))
