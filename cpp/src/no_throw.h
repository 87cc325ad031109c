// no_throw.h (private): the runtime APIs report kernels' exceptions and allocation failures as a Status.
#pragma once

#include <exception>
#include <new>

#include "cpuformer/model.h"

namespace cpuformer {

template <class Fn>
Status no_throw(Fn&& fn) {
  try {
    return fn();
  } catch (const std::bad_alloc&) {
    return Status::error("out of memory");
  } catch (const std::exception& e) {
    return Status::error(e.what());
  }
}

}  // namespace cpuformer
