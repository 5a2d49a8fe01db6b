// The kernel registry: name -> a launcher that unpacks cuLaunchKernel's `void** kernelParams` by the kernel's C++
// parameter types (each kernelParams[i] points at the value of parameter i, as the driver API defines it).
#pragma once

#include <cstddef>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace switchyard_emu {

/// One parameter as the host passes it: its size in bytes and whether it is a (device) pointer.
struct KernelParam {
    size_t size;
    bool pointer;
};

/// A registered kernel. `unpack` copies the arguments out of kernelParams into a heap tuple once per launch; `run`
/// calls the kernel with them (once per emulated thread); `release` frees the tuple.
struct KernelEntry {
    const char* name;
    std::vector<KernelParam> params;
    void* (*unpack)(void* const* kernel_params);
    void (*run)(const void* arguments);
    void (*release)(void* arguments);
};

template <typename F>
struct Signature;

template <typename... Args>
struct Signature<void (*)(Args...)> {
    using Tuple = std::tuple<std::remove_cv_t<Args>...>;

    template <typename T>
    static T read(void* const* kernel_params, size_t index) {
        T value;
        std::memcpy(&value, kernel_params[index], sizeof(T));
        return value;
    }

    template <size_t... I>
    static Tuple unpack(void* const* kernel_params, std::index_sequence<I...>) {
        return Tuple{read<std::remove_cv_t<Args>>(kernel_params, I)...};
    }

    static std::vector<KernelParam> params() {
        return {KernelParam{sizeof(std::remove_cv_t<Args>), std::is_pointer<std::remove_cv_t<Args>>::value}...};
    }
};

template <auto Kernel>
struct Launcher {
    using Sig = Signature<decltype(Kernel)>;
    using Tuple = typename Sig::Tuple;

    static void* unpack(void* const* kernel_params) {
        return new Tuple(Sig::unpack(kernel_params, std::make_index_sequence<std::tuple_size<Tuple>::value>{}));
    }
    static void run(const void* arguments) { std::apply(Kernel, *static_cast<const Tuple*>(arguments)); }
    static void release(void* arguments) { delete static_cast<Tuple*>(arguments); }
};

/// The kernels of all translation units (runtime.cpp calls each unit's register function once).
class Registry {
  public:
    template <auto Kernel>
    void add(const char* name) {
        entries_.push_back(KernelEntry{name, Launcher<Kernel>::Sig::params(), &Launcher<Kernel>::unpack,
                                       &Launcher<Kernel>::run, &Launcher<Kernel>::release});
    }
    const std::vector<KernelEntry>& entries() const { return entries_; }

  private:
    std::vector<KernelEntry> entries_;
};

}  // namespace switchyard_emu

#define SWITCHYARD_EMU_KERNEL(registry, kernel) (registry).add<&kernel>(#kernel)
