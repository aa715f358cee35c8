// erllama's C shim over llama.cpp's libllama-common: the few C++ helpers of llama.cpp that erllama reuses,
// exported with a C ABI so the cffi binding (ABI mode) can call them. Built by build_llama.py beside libllama;
// compiled against the same pinned tree, so it is llama.cpp's own code that runs (the one llama-server uses).
//
// Every function returns 0 on success and stores a malloc'ed string in *out; on failure it returns non-zero and
// *out holds the error message. The caller frees *out with erllama_shim_free.

#include "json-schema-to-grammar.h"

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

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

}  // extern "C"
