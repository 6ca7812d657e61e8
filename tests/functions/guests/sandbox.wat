;; Tries what a sandbox must deny, through WASI preview 1, and answers the
;; results as five i32 (LE): path_open("/etc/passwd") on fd 3 (the first
;; preopen, if any), fd_prestat_get(3), the environment's variable count,
;; the argument count, sock_accept(3). Nonzero errnos = denied; counts 0.
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_get" (func $prestat (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $env_sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "sock_accept" (func $accept (param i32 i32 i32) (result i32)))
  (import "tallow" "resp_write" (func $write (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "/etc/passwd")
  (func (export "handle") (result i32)
    (i32.store (i32.const 256) (call $path_open (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 11)
      (i32.const 0) (i64.const 0) (i64.const 0) (i32.const 0) (i32.const 512)))
    (i32.store (i32.const 260) (call $prestat (i32.const 3) (i32.const 512)))
    (drop (call $env_sizes (i32.const 600) (i32.const 604)))
    (i32.store (i32.const 264) (i32.load (i32.const 600)))
    (drop (call $args_sizes (i32.const 608) (i32.const 612)))
    (i32.store (i32.const 268) (i32.load (i32.const 608)))
    (i32.store (i32.const 272) (call $accept (i32.const 3) (i32.const 0) (i32.const 620)))
    (drop (call $write (i32.const 256) (i32.const 20)))
    (i32.const 0)))
