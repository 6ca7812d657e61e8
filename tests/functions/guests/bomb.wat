;; Grows its memory by 1 MiB (16 pages) until memory.grow fails, touching every
;; new page, then traps (unreachable): a capped memory bomb.
(module
  (memory (export "memory") 1)
  (func (export "handle") (result i32)
    (local $old i32) (local $p i32) (local $end i32)
    (loop $grow
      (local.set $old (memory.grow (i32.const 16)))
      (if (i32.eq (local.get $old) (i32.const -1)) (then unreachable))
      (local.set $p (i32.mul (local.get $old) (i32.const 65536)))
      (local.set $end (i32.add (local.get $p) (i32.const 1048576)))
      (loop $touch
        (i32.store8 (local.get $p) (i32.const 1))
        (local.set $p (i32.add (local.get $p) (i32.const 4096)))
        (br_if $touch (i32.lt_u (local.get $p) (local.get $end))))
      (br $grow))
    (i32.const 0)))
