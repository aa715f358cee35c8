/*
 * ABI probe: compiled by build_llama.py against the llama.h of the very source tree it builds.
 *
 * abi_probe_table.h is generated from native/llama.cdef and holds two things:
 *   - every function of the cdef, declared again with the cdef's prototype. C rejects a second declaration whose
 *     type conflicts with llama.h's, so a drifted signature stops the build right here;
 *   - PROBE_STRUCT / PROBE_FIELD lines for every struct the cdef declares in full.
 *
 * The program prints one line per struct ("S <name> <sizeof>") and per field ("F <name> <field> <offsetof>");
 * build_llama.py turns them into abi.json next to the libraries, and tests/unit/test_abi.py compares them with
 * cffi's ffi.sizeof/ffi.offsetof.
 */
#include <stddef.h>
#include <stdio.h>

#include "llama.h"

#define PROBE_STRUCT(T) printf("S %s %zu\n", #T, sizeof(T));
#define PROBE_FIELD(T, F) printf("F %s %s %zu\n", #T, #F, offsetof(T, F));

#include "abi_probe_table.h"

int main(void) {
    PROBE_TABLE
    return 0;
}
