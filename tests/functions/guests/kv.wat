;; A KV driver for the tests. Body: [op:1][store_len:1][store][key_len:2 LE][key][value...]
;; ops: g(et) s(et) d(elete) e(xists) k(eys) i(ncrement by 1) o(pen only).
;; Answer: the i32 result (LE), then the data (get, keys) or the new value (increment, i64 LE).
(module
  (import "tallow" "req_body_len" (func $blen (result i32)))
  (import "tallow" "req_body_read" (func $bread (param i32 i32 i32) (result i32)))
  (import "tallow" "resp_write" (func $write (param i32 i32) (result i32)))
  (import "tallow" "kv_open" (func $open (param i32 i32) (result i32)))
  (import "tallow" "kv_get" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "tallow" "kv_set" (func $set (param i32 i32 i32 i32 i32) (result i32)))
  (import "tallow" "kv_delete" (func $del (param i32 i32 i32) (result i32)))
  (import "tallow" "kv_exists" (func $exists (param i32 i32 i32) (result i32)))
  (import "tallow" "kv_get_keys" (func $keys (param i32 i32 i32) (result i32)))
  (import "tallow" "kv_increment" (func $incr (param i32 i32 i32 i64 i32) (result i32)))
  (memory (export "memory") 80)
  (global $IN i32 (i32.const 1024))
  (global $OUT i32 (i32.const 2621440))
  (func $answer (param $rc i32) (param $ptr i32) (param $n i32)
    (i32.store (i32.const 0) (local.get $rc))
    (drop (call $write (i32.const 0) (i32.const 4)))
    (if (i32.gt_s (local.get $n) (i32.const 0)) (then (drop (call $write (local.get $ptr) (local.get $n))))))
  (func (export "handle") (result i32)
    (local $len i32) (local $off i32) (local $n i32) (local $op i32) (local $sl i32) (local $h i32)
    (local $key i32) (local $kl i32) (local $val i32) (local $vl i32) (local $rc i32)
    (local.set $len (call $blen))
    (block $done (loop $more
      (local.set $n (call $bread (local.get $off) (i32.add (global.get $IN) (local.get $off)) (i32.const 65536)))
      (br_if $done (i32.eqz (local.get $n)))
      (local.set $off (i32.add (local.get $off) (local.get $n)))
      (br $more)))
    (local.set $op (i32.load8_u (global.get $IN)))
    (local.set $sl (i32.load8_u (i32.add (global.get $IN) (i32.const 1))))
    (local.set $h (call $open (i32.add (global.get $IN) (i32.const 2)) (local.get $sl)))
    (if (i32.lt_s (local.get $h) (i32.const 0)) (then (call $answer (local.get $h) (i32.const 0) (i32.const 0)) (return (i32.const 0))))
    (if (i32.eq (local.get $op) (i32.const 111)) (then (call $answer (local.get $h) (i32.const 0) (i32.const 0)) (return (i32.const 0))))
    (local.set $kl (i32.load16_u (i32.add (global.get $IN) (i32.add (i32.const 2) (local.get $sl)))))
    (local.set $key (i32.add (global.get $IN) (i32.add (i32.const 4) (local.get $sl))))
    (local.set $val (i32.add (local.get $key) (local.get $kl)))
    (local.set $vl (i32.sub (local.get $len) (i32.sub (local.get $val) (global.get $IN))))
    (if (i32.eq (local.get $op) (i32.const 103)) (then  ;; g
      (local.set $rc (call $get (local.get $h) (local.get $key) (local.get $kl) (global.get $OUT) (i32.const 0)))
      (if (i32.gt_s (local.get $rc) (i32.const 0)) (then
        (local.set $rc (call $get (local.get $h) (local.get $key) (local.get $kl) (global.get $OUT) (local.get $rc)))))
      (call $answer (local.get $rc) (global.get $OUT) (local.get $rc))))
    (if (i32.eq (local.get $op) (i32.const 115)) (then  ;; s
      (call $answer (call $set (local.get $h) (local.get $key) (local.get $kl) (local.get $val) (local.get $vl)) (i32.const 0) (i32.const 0))))
    (if (i32.eq (local.get $op) (i32.const 100)) (then  ;; d
      (call $answer (call $del (local.get $h) (local.get $key) (local.get $kl)) (i32.const 0) (i32.const 0))))
    (if (i32.eq (local.get $op) (i32.const 101)) (then  ;; e
      (call $answer (call $exists (local.get $h) (local.get $key) (local.get $kl)) (i32.const 0) (i32.const 0))))
    (if (i32.eq (local.get $op) (i32.const 107)) (then  ;; k
      (local.set $rc (call $keys (local.get $h) (global.get $OUT) (i32.const 0)))
      (if (i32.gt_s (local.get $rc) (i32.const 0)) (then
        (local.set $rc (call $keys (local.get $h) (global.get $OUT) (local.get $rc)))))
      (call $answer (local.get $rc) (global.get $OUT) (local.get $rc))))
    (if (i32.eq (local.get $op) (i32.const 105)) (then  ;; i
      (local.set $rc (call $incr (local.get $h) (local.get $key) (local.get $kl) (i64.const 1) (global.get $OUT)))
      (call $answer (local.get $rc) (global.get $OUT) (select (i32.const 8) (i32.const 0) (i32.eqz (local.get $rc))))))
    (i32.const 0)))
