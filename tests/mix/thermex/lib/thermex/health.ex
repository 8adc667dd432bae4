defmodule Thermex.Health do
  @moduledoc false
  # The health verdict, kept apart so that a release can ship a broken one
  # (versions/1.2.0) without copying the HTTP code.
  @vsn "@VSN@"

  @spec check() :: :ok | {:failing, binary()}
  def check, do: :ok
end
