//! kiln: a GPU compute engine for neural networks on WebGPU.
//!
//! Build a [`Graph`], compile it once on a [`Device`] into a [`Plan`], run the plan many times:
//!
//! ```no_run
//! # fn main() -> kiln::Result<()> {
//! let dev = kiln::Device::new()?; // KILN_BACKEND=vulkan|metal|dx12|gl|cpu, KILN_ADAPTER=<name>
//! let g = kiln::Graph::new();
//! let x = g.input("x", [64, 784]);
//! let w = g.param("w", [784, 10]);
//! let y = g.softmax(g.matmul(x, w)?, -1)?;
//! let mut plan = dev.compile(&g, &[y])?;
//! let x_host = kiln::Tensor::zeros([64, 784]);
//! let out = plan.run(&[("x", &x_host)])?;
//! assert_eq!(out[0].dims(), &[64, 10]);
//! # Ok(()) }
//! ```
//!
//! Every op has a CPU reference ([`Device::cpu`]), and [`Device::verify`] compares a GPU run with
//! it node by node.
//!
//! Tensors are f32 unless made f16 with [`Graph::input_as`] or [`Graph::cast`] (adapters with
//! SHADER_F16): products, convolutions, pooling, elementwise ops, softmax, dropout, reductions
//! and layout ops then store half floats and compute in f32 (on tensor cores where the adapter
//! has them); losses and recurrent layers take f32. See [`DType`] and [`Graph::cast`].

pub mod codegen;
pub mod cpu;
pub mod data;
pub mod device;
pub mod error;
pub mod exec;
pub mod graph;
pub mod models;
pub mod nn;
pub mod ops;
pub mod tensor;
pub mod verify;

pub use device::{BackendKind, Device, GemmPolicy, Precision};
pub use error::{Error, Result};
pub use exec::{Plan, PlanInfo};
pub use graph::{Graph, NodeId};
pub use tensor::{DType, Shape, Tensor};
pub use verify::{NodeReport, VerifyReport};
