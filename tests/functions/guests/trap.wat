;; Traps at once (unreachable).
(module
  (memory (export "memory") 1)
  (func (export "handle") (result i32) unreachable))
