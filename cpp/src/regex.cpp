// regex.cpp: part of the tokenizer work (issue 13); see cpp/include/cpuformer/tokenizer.h.
