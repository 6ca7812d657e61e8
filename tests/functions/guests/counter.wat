;; Stateful on purpose: a mutable global, a memory cell and a table slot that
;; each request bumps. With a fresh instance per request every answer is
;; "g=1 m=1 t=0": nothing survives from one request to the next.
;; Also writes a marker 0xAB at 60000 and reports whether it was already there.
(module
  (import "tallow" "resp_write" (func $write (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (table 2 funcref)
  (global $g (mut i32) (i32.const 0))
  (func $f)
  (data (i32.const 0) "g=0 m=0 t=0 k=0")
  (func (export "handle") (result i32)
    (global.set $g (i32.add (global.get $g) (i32.const 1)))
    (i32.store (i32.const 100) (i32.add (i32.load (i32.const 100)) (i32.const 1)))
    ;; t: 1 if table slot 1 was already set by an earlier request
    (i32.store8 (i32.const 10) (i32.add (i32.const 48) (i32.eqz (ref.is_null (table.get (i32.const 1))))))
    (table.set (i32.const 1) (ref.func $f))
    (i32.store8 (i32.const 2) (i32.add (i32.const 48) (global.get $g)))
    (i32.store8 (i32.const 6) (i32.add (i32.const 48) (i32.load (i32.const 100))))
    (i32.store8 (i32.const 14) (i32.add (i32.const 48) (i32.eq (i32.load8_u (i32.const 60000)) (i32.const 0xAB))))
    (i32.store8 (i32.const 60000) (i32.const 0xAB))
    (drop (call $write (i32.const 0) (i32.const 15)))
    (i32.const 0))
  (elem declare func $f))
