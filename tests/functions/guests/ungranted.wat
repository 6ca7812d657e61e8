;; Imports embed_text without being granted it: refused at start.
(module
  (import "tallow" "embed_text" (func $e (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "handle") (result i32) (i32.const 0)))
