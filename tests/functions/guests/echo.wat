;; Echoes the body, read in 7-byte chunks, with status 201; the query string
;; goes to x-query (two-call pattern: first call with capacity 0).
(module
  (import "tallow" "req_body_read" (func $read (param i32 i32 i32) (result i32)))
  (import "tallow" "req_query" (func $query (param i32 i32) (result i32)))
  (import "tallow" "resp_status" (func $status (param i32) (result i32)))
  (import "tallow" "resp_header" (func $header (param i32 i32 i32 i32) (result i32)))
  (import "tallow" "resp_write" (func $write (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) "x-query")
  (func (export "handle") (result i32)
    (local $off i32) (local $n i32)
    (drop (call $status (i32.const 201)))
    (local.set $n (call $query (i32.const 64) (i32.const 0)))
    (drop (call $query (i32.const 64) (local.get $n)))
    (drop (call $header (i32.const 0) (i32.const 7) (i32.const 64) (local.get $n)))
    (block $done
      (loop $more
        (local.set $n (call $read (local.get $off) (i32.const 4096) (i32.const 7)))
        (br_if $done (i32.eqz (local.get $n)))
        (drop (call $write (i32.const 4096) (local.get $n)))
        (local.set $off (i32.add (local.get $off) (local.get $n)))
        (br $more)))
    (i32.const 0)))
