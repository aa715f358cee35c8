// erllama's C shim over llama.cpp's libllama-common: the few C++ helpers of llama.cpp that erllama reuses,
// exported with a C ABI so the cffi binding (ABI mode) can call them. Built by build_llama.py beside libllama;
// compiled against the same pinned tree, so it is llama.cpp's own code that runs (the one llama-server uses).
//
// Every function returns 0 on success and stores a malloc'ed string in *out; on failure it returns non-zero and
// *out holds the error message. The caller frees *out with erllama_shim_free. The x87 helpers at the end are the
// exception: plain status codes, no strings.

#include "json-schema-to-grammar.h"

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#    include <cpuid.h>
#    define ERLLAMA_X87 1
#endif

#ifdef ERLLAMA_X87
namespace {

// 0: no XSAVE enabled by the OS; 1: XSAVE/XRSTOR usable; 2: and XGETBV(1) reports the in-use bitmap
int x87_support() {
    static const int support = [] {
        unsigned a = 0, b = 0, c = 0, d = 0;
        if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) {  // CPUID.1:ECX.OSXSAVE
            return 0;
        }
        if (__get_cpuid_max(0, nullptr) < 0xD) {
            return 1;
        }
        __cpuid_count(0xD, 1, a, b, c, d);
        return (a & (1u << 2)) ? 2 : 1;  // CPUID.(EAX=0DH,ECX=1):EAX[2]: XGETBV with ECX=1
    }();
    return support;
}

unsigned long long xinuse() {
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(1u));
    return (static_cast<unsigned long long>(hi) << 32) | lo;
}

}  // namespace
#endif

extern "C" {

int erllama_json_schema_to_grammar(const char * schema_json, char ** out) {
    try {
        const std::string grammar = json_schema_to_grammar(common_json::parse(std::string(schema_json)));
        *out = strdup(grammar.c_str());
        return 0;
    } catch (const std::exception & e) {
        *out = strdup(e.what());
    } catch (...) {
        *out = strdup("unknown error");
    }
    return 1;
}

void erllama_shim_free(char * p) { std::free(p); }

// x87 state hygiene. A thread that has run any x87 instruction (long double arithmetic: numpy's import does some)
// keeps its x87 register state "in use" (XINUSE bit 0) for the rest of its life, and threads it creates inherit
// it, ggml's compute threads included. On the virtual machines we measured, ggml's AVX2 kernels then run ~2%
// slower (same instructions, same memory; see docs/runtime.md). XRSTOR from an area whose header marks the x87
// component as initial puts it back in its initial configuration, and nothing else: SSE/AVX state and MXCSR are
// outside the restore mask.

// 1: this thread's x87 state is in use; 0: it is in its initial configuration; -1: this CPU cannot tell.
int erllama_x87_in_use(void) {
#ifdef ERLLAMA_X87
    if (x87_support() == 2) {
        return static_cast<int>(xinuse() & 1u);
    }
#endif
    return -1;
}

// Put this thread's x87 state back in its initial configuration. 1: reset; 0: it already was; -1: left alone
// (not x86-64, no XSAVE, or a program set a non-default x87 control word on purpose).
int erllama_x87_reset(void) {
#ifdef ERLLAMA_X87
    if (x87_support() == 0) {
        return -1;
    }
    unsigned short cw = 0;
    __asm__ volatile("fnstcw %0" : "=m"(cw));
    if (cw != 0x037F) {
        return -1;
    }
    if (x87_support() == 2 && !(xinuse() & 1u)) {
        return 0;
    }
    // legacy region (512 bytes) + XSAVE header (64 bytes), all zero: XSTATE_BV[0] = 0 and the mask (EDX:EAX) = 1,
    // so XRSTOR initialises the x87 component and touches nothing else
    alignas(64) unsigned char area[576] = {};
    __asm__ volatile("xrstor %0" : : "m"(area), "a"(1u), "d"(0u) : "memory");
    return 1;
#else
    return -1;
#endif
}

}  // extern "C"
