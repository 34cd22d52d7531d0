/*
 * abi_check.c -- csrc/gpu.h's hand declarations against the real
 * cuda_runtime_api.h and nccl.h (docs/design.md §5.3), built and run by
 * tests/test_abi.py once per pair of header folders:
 *
 *   cc -std=c11 -I csrc -isystem CUDA_INCLUDE \
 *      '-DAD_REAL_NCCL_H="NCCL_INCLUDE/nccl.h"' csrc/tests/abi_check.c -o abi_check
 *   ./abi_check
 *
 * (the real nccl.h is named by its path: csrc/nccl.h, the transport's own
 * header, is first on the include path).
 *
 * gpu.h declares nothing under the libraries' own names (its types and
 * constants are ad_ / AD_; the function names are only struct members and
 * strings), so both sets of declarations live side by side here.  Most
 * checks are _Static_asserts: a difference does not compile.  What C cannot
 * compare at compile time (a name the headers turn into a macro, the
 * values NCCL_CONFIG_INITIALIZER fills in) is checked by main(), which
 * prints one summary line.  Nothing is linked: the real functions are only
 * named inside __typeof__.
 *
 * Functions.  C treats distinct enum and struct-pointer types as
 * incompatible even where the call ABI is the same (cudaError_t versus
 * int), so each function is checked in two steps:
 *   1. every type gpu.h uses in a signature is mapped to the library's
 *      type it stands for, and each pair is asserted to have the same
 *      size, alignment and ABI kind (integer -- enums included -- pointer,
 *      struct);
 *   2. with the ad_ type names #defined to the real ones, each entry of
 *      AD_GPU_FUNCTIONS spells a function-pointer type that must be
 *      compatible with the real declaration (__builtin_types_compatible_p):
 *      same parameter count, and per parameter the mapped type.
 * Together: same count, and per parameter (and the return value) the same
 * size and kind as the library's.  csrc/tests/abi_check.cc compares each
 * parameter directly, where a C++ compiler is available.
 */
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <cuda_runtime_api.h>

#ifndef AD_REAL_NCCL_H
#error "define AD_REAL_NCCL_H as the quoted path of the real nccl.h"
#endif
#include AD_REAL_NCCL_H

#include "gpu.h"

#if !defined(__GNUC__) && !defined(__clang__)
#error "abi_check.c needs __typeof__, __builtin_types_compatible_p and __builtin_classify_type"
#endif

/* ---------------------------------------------------------------- types */

/* GCC's type classes: 1 integer, 3 enum, 5 pointer, 12 struct.  An enum is
 * passed like the integer of its size, so both count as "integer" (1). */
#define ABI_KIND(T) (__builtin_classify_type(*(T *)0) == 3 ? 1 : __builtin_classify_type(*(T *)0))
#define SAME_ABI(ours, real)                                                          \
    _Static_assert(sizeof(ours) == sizeof(real) && _Alignof(ours) == _Alignof(real) && \
                       ABI_KIND(ours) == ABI_KIND(real),                                \
                   #ours " and " #real " differ in size, alignment or ABI kind")

SAME_ABI(ad_cuda_error, cudaError_t);
SAME_ABI(ad_cuda_stream, cudaStream_t);
SAME_ABI(ad_cuda_event, cudaEvent_t);
SAME_ABI(ad_nccl_result, ncclResult_t);
SAME_ABI(ad_nccl_datatype, ncclDataType_t);
SAME_ABI(ad_nccl_comm, ncclComm_t);
SAME_ABI(ad_nccl_id, ncclUniqueId);
SAME_ABI(ad_nccl_id *, ncclUniqueId *);
SAME_ABI(ad_nccl_config *, ncclConfig_t *);
_Static_assert(ABI_KIND(ad_cuda_error) == 1 && ABI_KIND(ad_cuda_stream) == 5 &&
                   ABI_KIND(ad_nccl_id) == 12,
               "the kinds themselves: integer, pointer, struct");

/* The unique id travels by value: its bytes must be the whole struct. */
_Static_assert(AD_NCCL_UNIQUE_ID_BYTES == NCCL_UNIQUE_ID_BYTES, "NCCL_UNIQUE_ID_BYTES");
_Static_assert(sizeof(((ad_nccl_id *)0)->internal) == sizeof(((ncclUniqueId *)0)->internal),
               "ncclUniqueId.internal");
_Static_assert(offsetof(ad_nccl_id, internal) == 0, "ncclUniqueId.internal offset");

/* ncclConfig_t: ours is a prefix of the real layout (NCCL reads at most its
 * own size of what we pass and only the fields `version` covers; see
 * config_init in nccl.c).  The 2.17 fields exist in headers from 2.17 on. */
#define SAME_FIELD(field)                                                              \
    _Static_assert(offsetof(ad_nccl_config, field) == offsetof(ncclConfig_t, field) &&   \
                       sizeof(((ad_nccl_config *)0)->field) ==                           \
                           sizeof(((ncclConfig_t *)0)->field),                           \
                   "ncclConfig_t." #field " offset or size")
SAME_FIELD(size);
SAME_FIELD(magic);
SAME_FIELD(version);
SAME_FIELD(blocking);
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 17, 0)
SAME_FIELD(cgaClusterSize);
SAME_FIELD(minCTAs);
SAME_FIELD(maxCTAs);
SAME_FIELD(netName);
_Static_assert(sizeof(ad_nccl_config) <= sizeof(ncclConfig_t), "ncclConfig_t prefix");
_Static_assert(_Alignof(ad_nccl_config) == _Alignof(ncclConfig_t), "ncclConfig_t alignment");
#endif

/* ------------------------------------------------------------ constants */

#define SAME_VALUE(ours, real) _Static_assert((long long)(ours) == (long long)(real), #ours " != " #real)

SAME_VALUE(AD_CUDA_SUCCESS, cudaSuccess);
SAME_VALUE(AD_CUDA_ERROR_INSUFFICIENT_DRIVER, cudaErrorInsufficientDriver);
SAME_VALUE(AD_CUDA_ERROR_NO_DEVICE, cudaErrorNoDevice);
SAME_VALUE(AD_CUDA_ERROR_NOT_READY, cudaErrorNotReady);
SAME_VALUE(AD_CUDA_STREAM_NON_BLOCKING, cudaStreamNonBlocking);
SAME_VALUE(AD_CUDA_EVENT_DISABLE_TIMING, cudaEventDisableTiming);

SAME_VALUE(AD_NCCL_SUCCESS, ncclSuccess);
SAME_VALUE(AD_NCCL_UNHANDLED_CUDA_ERROR, ncclUnhandledCudaError);
SAME_VALUE(AD_NCCL_SYSTEM_ERROR, ncclSystemError);
SAME_VALUE(AD_NCCL_INTERNAL_ERROR, ncclInternalError);
SAME_VALUE(AD_NCCL_INVALID_ARGUMENT, ncclInvalidArgument);
SAME_VALUE(AD_NCCL_INVALID_USAGE, ncclInvalidUsage);
SAME_VALUE(AD_NCCL_REMOTE_ERROR, ncclRemoteError);
SAME_VALUE(AD_NCCL_IN_PROGRESS, ncclInProgress);
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 30, 0)
SAME_VALUE(AD_NCCL_TIMEOUT, ncclTimeout);
#else
SAME_VALUE(AD_NCCL_TIMEOUT, ncclNumResults); /* the next free code before 2.30 */
#endif

SAME_VALUE(AD_NCCL_INT8, ncclInt8);
SAME_VALUE(AD_NCCL_UINT8, ncclUint8);
SAME_VALUE(AD_NCCL_INT32, ncclInt32);
SAME_VALUE(AD_NCCL_UINT32, ncclUint32);
SAME_VALUE(AD_NCCL_INT64, ncclInt64);
SAME_VALUE(AD_NCCL_UINT64, ncclUint64);
SAME_VALUE(AD_NCCL_FLOAT16, ncclFloat16);
SAME_VALUE(AD_NCCL_FLOAT32, ncclFloat32);
SAME_VALUE(AD_NCCL_FLOAT64, ncclFloat64);
#if defined(__CUDA_BF16_TYPES_EXIST__) || NCCL_VERSION_CODE >= NCCL_VERSION(2, 27, 0)
SAME_VALUE(AD_NCCL_BFLOAT16, ncclBfloat16);
#define BF16_CHECKED 1
#else
#define BF16_CHECKED 0
#endif

SAME_VALUE(AD_NCCL_VERSION_CODE(NCCL_MAJOR, NCCL_MINOR, NCCL_PATCH), NCCL_VERSION_CODE);
SAME_VALUE(AD_NCCL_VERSION_CODE(2, 14, 0), NCCL_VERSION(2, 14, 0));
SAME_VALUE(AD_NCCL_VERSION_CODE(2, 17, 0), NCCL_VERSION(2, 17, 0));
SAME_VALUE(AD_NCCL_VERSION_CODE(2, 30, 0), NCCL_VERSION(2, 30, 0));
#ifdef NCCL_API_MAGIC
SAME_VALUE(AD_NCCL_CONFIG_MAGIC, NCCL_API_MAGIC);
#endif
#ifdef NCCL_CONFIG_UNDEF_INT
SAME_VALUE(AD_NCCL_CONFIG_UNDEF_INT, NCCL_CONFIG_UNDEF_INT);
#endif

/* ------------------------------------------------------------ functions */

/* Sizes main() prints, taken while the ad_ names are still ours. */
static const size_t our_config_bytes = sizeof(ad_nccl_config);

/* Step 2 above: from here on the ad_ names mean the library's types. */
#define ad_cuda_error cudaError_t
#define ad_cuda_stream cudaStream_t
#define ad_cuda_event cudaEvent_t
#define ad_nccl_result ncclResult_t
#define ad_nccl_datatype ncclDataType_t
#define ad_nccl_comm ncclComm_t
#define ad_nccl_id ncclUniqueId
#define ad_nccl_config ncclConfig_t

#define SAME_FUNCTION(lib, required, ret, name, params)                                \
    _Static_assert(__builtin_types_compatible_p(__typeof__(&name), ret(*) params),       \
                   #name ": the signature in gpu.h differs from the library");              \
    _Static_assert(sizeof(#name) == sizeof(STRING(name)),                                \
                   #name " is a macro in the library's header (a versioned entry point)");
#define STRING(x) STRING_(x)
#define STRING_(x) #x
AD_GPU_FUNCTIONS(SAME_FUNCTION)

/* ----------------------------------------------------- run-time checks */

static int failures;

static void expect(int ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "ABI mismatch: %s\n", what);
        failures++;
    }
}

int main(void)
{
    int functions = 0;
    ncclConfig_t init = NCCL_CONFIG_INITIALIZER;

    /* The name dlsym looks up is the name the header declares. */
#define SAME_NAME(lib, required, ret, name, params)                                    \
    expect(strcmp(#name, STRING(name)) == 0, #name " is renamed by a macro");          \
    functions++;
    AD_GPU_FUNCTIONS(SAME_NAME)

    /* What config_init (nccl.c) writes mirrors NCCL_CONFIG_INITIALIZER. */
    expect(init.magic == AD_NCCL_CONFIG_MAGIC, "NCCL_CONFIG_INITIALIZER magic");
    expect(init.size == sizeof init, "NCCL_CONFIG_INITIALIZER size");
    expect(init.version == (unsigned)NCCL_VERSION_CODE, "NCCL_CONFIG_INITIALIZER version");
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 17, 0)
    expect(init.blocking == AD_NCCL_CONFIG_UNDEF_INT && init.cgaClusterSize == AD_NCCL_CONFIG_UNDEF_INT &&
               init.minCTAs == AD_NCCL_CONFIG_UNDEF_INT && init.maxCTAs == AD_NCCL_CONFIG_UNDEF_INT &&
               init.netName == NULL,
           "NCCL_CONFIG_INITIALIZER leaves our fields undefined");
#endif

    printf("ABI %s: %d functions; types, constants and ncclConfig_t (%zu of %zu bytes) against "
           "CUDA runtime %d.%d headers and NCCL %d.%d.%d headers%s\n",
           failures == 0 ? "ok" : "MISMATCH", functions, our_config_bytes,
           sizeof(ncclConfig_t), CUDART_VERSION / 1000, (CUDART_VERSION % 1000) / 10, NCCL_MAJOR,
           NCCL_MINOR, NCCL_PATCH, BF16_CHECKED ? "" : " (ncclBfloat16 not declared there)");
    return failures == 0 ? 0 : 1;
}
