// cpuformer.h: everything in the cpuformer C++ core.
#pragma once

#include "cpuformer/activations.h"
#include "cpuformer/attention.h"
#include "cpuformer/block.h"
#include "cpuformer/common.h"
#include "cpuformer/embedding.h"
#include "cpuformer/feedforward.h"
#include "cpuformer/layernorm.h"
#include "cpuformer/linear.h"
#include "cpuformer/loss.h"
#include "cpuformer/matmul.h"
#include "cpuformer/model.h"
#include "cpuformer/optim.h"
#include "cpuformer/positions.h"
#include "cpuformer/quantize.h"
#include "cpuformer/runtime.h"
#include "cpuformer/softmax.h"
