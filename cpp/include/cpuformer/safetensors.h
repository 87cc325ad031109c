// cpuformer/safetensors.h: safetensors files and Hugging Face weight directories, memory-mapped in place.
//
//   std::unique_ptr<cpuformer::SafetensorsMap> map;
//   cpuformer::Status st = cpuformer::SafetensorsMap::open_directory("llama-dir", &map);  // or open_file(path)
//   if (!st.ok()) { std::cerr << st.message() << "\n"; return 1; }
//   const cpuformer::TensorView* w = map->find("model.embed_tokens.weight");  // BF16 stays BF16: w->data, w->nbytes
//   std::vector<float> f;
//   st = cpuformer::tensor_to_float(*w, &f);                                  // a float32 copy when one is needed
//
// Files are mapped read-only (POSIX mmap; where that is unavailable or fails, the file is read into memory) and
// opening reads and validates only the header: no tensor byte is touched or copied until the caller reads it, so a
// checkpoint costs address space, not memory, and pages that are never read are never loaded. Validation is the
// same as read_safetensors' (model.h; one parser serves both): header length within the file and at most 100 MiB,
// JSON nested at most 64 levels, names unique, offsets inside the data section, byte counts equal to the element
// count times the dtype's size, no two tensors overlapping, at most 8 dimensions. Every dtype of the format with a
// whole byte size is accepted; the sub-byte ones (F4, F6_*) are an error. Error messages start with the file's
// path and name the tensor.
//
// Views point into the mapping, so they live as long as the map; the data may be unaligned (old writers do not pad
// the header). The file must not be truncated or rewritten in place while mapped (the OS would signal on access);
// writers that replace files by rename (cpuformer's, Hugging Face's) are safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "cpuformer/model.h"  // Status

namespace cpuformer {

// The safetensors dtypes with a whole byte size. The F8 formats and C64 (two float32) are carried as raw bytes.
enum class DType {
  kBool, kU8, kI8, kF8E5M2, kF8E4M3, kF8E8M0, kF8E4M3FNUZ, kF8E5M2FNUZ,  // 1 byte
  kI16, kU16, kF16, kBF16,                                               // 2 bytes
  kI32, kU32, kF32,                                                      // 4 bytes
  kI64, kU64, kF64, kC64,                                                // 8 bytes
};
std::size_t dtype_size(DType dtype);   // bytes per element
const char* dtype_name(DType dtype);   // the file's spelling: "F32", "BF16", "F8_E4M3", ...

// One tensor of a mapped file: its bytes as stored (little-endian, C order).
struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<std::int64_t> shape;
  const unsigned char* data = nullptr;  // into the mapping (or the buffer); element alignment is NOT guaranteed
  std::uint64_t nbytes = 0;             // numel() * dtype_size(dtype)
  std::string file;                     // the file it came from (for error messages; "" for a buffer)
  std::int64_t numel() const;
};

// One or more safetensors files mapped read-only for the object's lifetime. Immutable after open, so any number of
// threads may read it at once.
class SafetensorsMap {
 public:
  static Status open_file(const std::string& path, std::unique_ptr<SafetensorsMap>* out);
  // A Hugging Face model directory: model.safetensors, or else model.safetensors.index.json ({"metadata": {...},
  // "weight_map": {tensor: shard file}}) and its shards. Shards are plain file names inside the directory; every
  // shard the index names must exist and hold exactly the tensors the index maps to it (shards it does not name
  // are ignored). metadata() merges the shards' __metadata__ (the first shard in name order wins a clash); the
  // index's own "metadata" (total_size) is not part of it.
  static Status open_directory(const std::string& dir, std::unique_ptr<SafetensorsMap>* out);
  // A file's bytes in memory (the map keeps its own copy): for fuzzing and embedded use.
  static Status open_buffer(const void* data, std::size_t size, std::unique_ptr<SafetensorsMap>* out);

  const TensorView* find(const std::string& name) const;  // nullptr if absent
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  std::uint64_t mapped_bytes() const { return mapped_bytes_; }  // the held files' total size
  ~SafetensorsMap();

  SafetensorsMap(const SafetensorsMap&) = delete;
  SafetensorsMap& operator=(const SafetensorsMap&) = delete;

 private:
  struct File;  // one mapped (or read, or copied) file
  friend class SafetensorsLoader;
  SafetensorsMap();
  std::vector<std::unique_ptr<File>> files_;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
  std::uint64_t mapped_bytes_ = 0;
};

// A float32 copy of a tensor of a floating dtype (F32, F16, BF16, F64; any alignment); an error Status naming the
// file and tensor for the others. out is written only on success.
Status tensor_to_float(const TensorView& t, std::vector<float>* out);
// The same into out[0 .. t.nbytes / dtype_size(t.dtype)) (the caller's buffer, written in place: fresh pages are
// first touched by the conversion itself).
Status tensor_to_float(const TensorView& t, float* out);

}  // namespace cpuformer
