//! Layers (normalization, attention and transformer layers among them), losses, optimizers, initialisation and checkpoints.

pub mod attention;
pub mod checkpoint;
pub mod init;
pub mod layers;
pub mod norm;
pub mod optim;
pub mod rnn;
pub mod train;

pub use attention::{
    decode_mask, padding_mask, FeedForwardAct, MultiheadAttention, TransformerDecoderLayer,
    TransformerEncoderLayer,
};
pub use init::Init;
pub use layers::{
    dropout, dropout_seed, Act, Conv1d, Conv2d, ConvTranspose2d, Layer, Linear, PRelu, Sequential,
};
pub use norm::{BatchNorm, GroupNorm, LayerNorm, RmsNorm};
pub use optim::{GradScaler, Optimizer, Plateau, PlateauMode, ScalerState, Schedule};
pub use rnn::{Cell, Embedding, Lstm, LstmOutput, Recurrent, RecurrentOutput};
pub use train::TrainStep;
