defmodule Thermex.Health do
  @moduledoc false
  # 1.2.0: installs fine, then reports itself unhealthy (HTTP 503).
  @vsn "@VSN@"

  @spec check() :: :ok | {:failing, binary()}
  def check, do: {:failing, "1.2.0 ships a broken dependency check"}
end
