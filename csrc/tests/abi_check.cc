/*
 * abi_check.cc -- the per-parameter half of the ABI check (abi_check.c
 * has the rest; tests/test_abi.py compiles this one too where a C++
 * compiler is installed):
 *
 *   c++ -std=c++17 -fsyntax-only -I csrc -isystem CUDA_INCLUDE \
 *       '-DAD_REAL_NCCL_H="NCCL_INCLUDE/nccl.h"' csrc/tests/abi_check.cc
 *
 * For every entry of AD_GPU_FUNCTIONS, the real function's type and the
 * type of our ad_gpu_api field are taken apart by template: the parameter
 * counts must be equal, and each parameter (and the return value) must have
 * the same size, alignment and ABI kind (integer -- enums included --
 * pointer, struct).  No mapping between our type names and the library's
 * is involved, so this check does not depend on the one abi_check.c makes.
 */
#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>

#include <cuda_runtime_api.h>
#include AD_REAL_NCCL_H

#include "gpu.h"

namespace {

enum class Kind { integer, pointer, record, floating, other };

template <class T> constexpr Kind kind()
{
    if (std::is_integral<T>::value || std::is_enum<T>::value)
        return Kind::integer;
    if (std::is_pointer<T>::value)
        return Kind::pointer;
    if (std::is_class<T>::value)
        return Kind::record;
    if (std::is_floating_point<T>::value)
        return Kind::floating;
    return Kind::other;
}

template <class A, class B> constexpr bool same_abi()
{
    return sizeof(A) == sizeof(B) && alignof(A) == alignof(B) && kind<A>() == kind<B>();
}

template <class> struct signature;
template <class R, class... Args> struct signature<R (*)(Args...)> {
    using result = R;
    using params = std::tuple<Args...>;
    static constexpr std::size_t count = sizeof...(Args);
};

template <class Real, class Ours, std::size_t... I>
constexpr bool params_match(std::index_sequence<I...>)
{
    return (true && ... &&
            same_abi<std::tuple_element_t<I, typename signature<Real>::params>,
                     std::tuple_element_t<I, typename signature<Ours>::params>>());
}

template <class Real, class Ours> constexpr bool counts_match()
{
    return signature<Real>::count == signature<Ours>::count;
}

template <class Real, class Ours> constexpr bool all_params_match()
{
    if constexpr (counts_match<Real, Ours>())
        return params_match<Real, Ours>(std::make_index_sequence<signature<Real>::count>{});
    else
        return false;
}

#define SAME_FUNCTION(lib, required, ret, name, params)                                         \
    static_assert(counts_match<decltype(&::name), decltype(ad_gpu_api::name)>(),               \
                  #name ": parameter count differs from the library's");                      \
    static_assert(all_params_match<decltype(&::name), decltype(ad_gpu_api::name)>(),           \
                  #name ": a parameter differs in size, alignment or kind");                  \
    static_assert(same_abi<signature<decltype(&::name)>::result,                               \
                           signature<decltype(ad_gpu_api::name)>::result>(),                   \
                  #name ": the return type differs in size, alignment or kind");
AD_GPU_FUNCTIONS(SAME_FUNCTION)

} // namespace
